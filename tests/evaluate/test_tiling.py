import math

import pytest
import torch

from drseg.evaluate.tiling import gaussian_weights, predict_probabilities, tile_starts


def _conv(kernel: int, seed: int = 0, classes: int = 4) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, classes, kernel, padding=kernel // 2)
    conv.requires_grad_(False)
    return conv


def _image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


def _whole(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(net(image[None]))[0]


def test_tiles_cover_the_image_exactly_with_the_last_one_flush() -> None:
    assert tile_starts(160, 64, 0.5) == [0, 32, 64, 96]
    assert tile_starts(100, 64, 0.5) == [0, 18, 36]  # 3 tiles, evenly spread, 36 + 64 = 100
    assert tile_starts(128, 64, 0.0) == [0, 64]
    assert tile_starts(64, 64, 0.5) == [0]
    assert tile_starts(40, 64, 0.5) == [0]


def test_gaussian_weights_peak_at_the_centre_and_stay_positive() -> None:
    weights = gaussian_weights(64, 32)
    assert weights.shape == (64, 32)
    assert weights.max().item() == 1.0
    assert weights[31:33, 15:17].eq(1.0).all()  # the four centre pixels of an even tile
    assert weights.min().item() == pytest.approx(1e-3)  # corners: exp(-15.5) floored
    # row 39 is 7.5 px from the centre (31.5), the peak rows 0.5 px; sigma = 64 / 8
    assert weights[39, 16].item() == pytest.approx(
        math.exp(-(7.5**2 - 0.5**2) / (2 * 8**2)), rel=1e-6
    )
    assert torch.equal(weights, weights.flip(0)) and torch.equal(weights, weights.flip(1))


def test_an_image_inside_one_tile_equals_whole_image_inference() -> None:
    net, image = _conv(3), _image(64, 96)
    tiled = predict_probabilities(net, image, 128, 0.5, 2, tta_flips=False)
    assert torch.allclose(tiled, _whole(net, image), atol=1e-6)


def test_overlapping_tiles_leave_no_seams() -> None:
    # A 1x1 conv gives every pixel the same answer in every tile, so any seam, misplaced
    # tile or unnormalised weight would show as a difference from whole-image inference.
    net, image = _conv(1), _image(150, 200)
    tiled = predict_probabilities(net, image, 64, 0.5, 3, tta_flips=False)
    assert (tiled - _whole(net, image)).abs().max().item() < 1e-5


def test_tiles_are_weighted_towards_their_centre() -> None:
    # Each tile answers one constant: the mean of its input. At the centre of the first
    # tile its own weight is 1 and its neighbour's is floored to 1e-3, so the result is the
    # first tile's answer, not the plain average of the two tiles covering that pixel.
    image = torch.arange(128.0).div(128).expand(3, 64, 128).contiguous()

    def tile_mean(batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *batch.shape[2:])

    probs = predict_probabilities(tile_mean, image, 64, 0.5, 4, tta_flips=False)
    first, second = (torch.sigmoid(image[0, 0, s : s + 64].mean()).item() for s in (0, 32))
    assert probs[0, 32, 32].item() == pytest.approx((first + 1e-3 * second) / 1.001, abs=1e-4)
    assert abs(probs[0, 32, 32].item() - (first + second) / 2) > 0.01


def test_flip_tta_of_a_flip_equivariant_net_changes_nothing() -> None:
    net = _conv(3)
    kernel = net.weight
    kernel.copy_((kernel + kernel.flip(2) + kernel.flip(3) + kernel.flip(2, 3)) / 4)
    image = _image(96, 160)
    plain = predict_probabilities(net, image, 64, 0.5, 4, tta_flips=False)
    flipped = predict_probabilities(net, image, 64, 0.5, 4, tta_flips=True)
    assert (plain - flipped).abs().max().item() < 1e-6


def test_flip_tta_averages_the_four_flipped_predictions() -> None:
    net, image = _conv(3, seed=5), _image(64, 64)
    flips = [(), (2,), (1,), (1, 2)]
    expected = torch.stack([_whole(net, image.flip(dims)).flip(dims) for dims in flips]).mean(0)
    tta = predict_probabilities(net, image, 64, 0.0, 1, tta_flips=True)
    assert torch.allclose(tta, expected, atol=1e-6)
    assert not torch.allclose(tta, _whole(net, image), atol=1e-4)


def test_output_is_a_float_probability_map_of_the_image_size() -> None:
    def extreme(batch: torch.Tensor) -> torch.Tensor:
        return torch.where(batch[:, :2] > 0, 100.0, -100.0)

    probs = predict_probabilities(extreme, _image(100, 130), 64, 0.25, 2, tta_flips=True)
    assert probs.shape == (2, 100, 130) and probs.dtype == torch.float32
    assert probs.min().item() >= 0.0 and probs.max().item() <= 1.0
    probs.add_(0)  # an ordinary tensor, not an inference-mode one


def test_an_image_smaller_than_a_tile_is_padded_to_a_multiple_of_32() -> None:
    net, image = _conv(1), _image(50, 70)
    shapes: list[tuple[int, ...]] = []

    def recording(batch: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(batch.shape))
        return net(batch)

    probs = predict_probabilities(recording, image, 128, 0.5, 4, tta_flips=False)
    assert shapes == [(1, 3, 64, 96)]
    assert torch.allclose(probs, _whole(net, image), atol=1e-6)


def test_tiles_go_to_the_model_in_batches() -> None:
    sizes: list[int] = []

    def recording(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return batch[:, :1]

    predict_probabilities(recording, _image(96, 96), 32, 0.0, 4, tta_flips=False)
    assert sizes == [4, 4, 1]  # 3 x 3 tiles


def test_bad_tile_size_and_bad_logits_are_refused_with_the_fix() -> None:
    net, image = _conv(1), _image(64, 64)
    with pytest.raises(ValueError, match=r"tile_size 100 is not a multiple of 32.*e\.g\. 96"):
        predict_probabilities(net, image, 100, 0.5, 1, tta_flips=False)
    with pytest.raises(ValueError, match=r"returned shape \(1, 4, 32, 32\).*\(B, C, h, w\)"):
        predict_probabilities(lambda b: net(b)[:, :, ::2, ::2], image, 64, 0.5, 1, False)
