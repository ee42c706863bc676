"""SimCLR views: placement inside the field of view, geometry, colour that keeps hue, blur."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from drseg.models.normalize import IMAGE_MEAN, IMAGE_STD, image_to_tensor
from drseg.train.views import (
    MAX_SHIFT,
    Photograph,
    Placement,
    ViewPairStream,
    ViewParams,
    cut_window,
    fov_interior,
    gaussian_blur,
    photograph,
    place_pair,
    render_pairs,
    render_views,
    sample_view_pair,
    window_side,
)

FUNDUS_RGB = (167, 81, 23)
"""Mean background colour inside the FOV (DOMAIN.md)."""


def _fundus_fov(width: int = 320, height: int = 212) -> np.ndarray:
    """A disc of radius 0.4 x width, centred, cut flat at top and bottom by the frame."""
    ys, xs = np.mgrid[:height, :width]
    return np.asarray((ys - height / 2) ** 2 + (xs - width / 2) ** 2 <= (0.4 * width) ** 2)


def _unnormalise(views: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) normalised -> RGB in 0..1."""
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return views * std + torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)


def _plain(placements: list[Placement]) -> ViewParams:
    """Geometry only: colour factors 1 and no blur."""
    n = len(placements)
    ones = torch.ones(n)
    return ViewParams(
        angle=torch.tensor([p.angle for p in placements]),
        flip=torch.tensor([float(p.flip) for p in placements]),
        brightness=ones,
        contrast=ones,
        saturation=ones,
        blur_sigma=torch.zeros(n),
    )


def _render(image: np.ndarray, placements: list[Placement], size: int) -> torch.Tensor:
    side = window_side(size)
    windows = np.stack([cut_window(image, p.y, p.x, side) for p in placements])
    return render_views(torch.from_numpy(windows), _plain(placements), size)


def _view_coordinates(placement: Placement, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) photograph coordinates of every view pixel, from Placement's docstring."""
    i, j = np.mgrid[:size, :size].astype(np.float64)
    u, v = j - (size - 1) / 2, i - (size - 1) / 2
    cos, sin = math.cos(placement.angle), math.sin(placement.angle)
    if placement.flip:
        u = -u
    return placement.y - 0.5 + sin * u + cos * v, placement.x - 0.5 + cos * u - sin * v


def test_fov_interior_keeps_pixels_whose_neighbourhood_is_all_fov() -> None:
    fov = np.zeros((15, 15), dtype=bool)
    fov[2:11, 3:12] = True
    expected = np.zeros_like(fov)
    expected[5:8, 6:9] = True
    assert np.array_equal(fov_interior(fov, radius=3), expected)
    assert np.array_equal(fov_interior(fov, radius=0), fov)
    assert not fov_interior(np.ones((5, 5), dtype=bool), radius=3).any()  # the frame is outside


def test_plain_view_is_the_crop_normalised_as_image_to_tensor() -> None:
    image = np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    view = _render(image, [Placement(50, 70, 0.0, False)], 64)[0]
    expected = image_to_tensor(image[50 - 32 : 50 + 32, 70 - 32 : 70 + 32])
    # atol: affine_grid's float32 coordinates are off by ~1e-5 px, ~0.003 of a grey level.
    assert torch.allclose(view, expected, atol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
def test_views_show_the_photograph_where_the_placement_says(flip: bool) -> None:
    """On a ramp photograph (red = x, green = y) bilinear sampling is exact."""
    ys, xs = np.mgrid[:256, :256]
    image = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    placements = [Placement(128, 120, angle, flip) for angle in (0.0, 0.3, 2.0, 4.5)]
    views = _unnormalise(_render(image, placements, 64)) * 255
    for view, placement in zip(views, placements, strict=True):
        y, x = _view_coordinates(placement, 64)
        assert np.allclose(view[0].numpy(), x, atol=0.01)
        assert np.allclose(view[1].numpy(), y, atol=0.01)


def test_views_stay_inside_the_field_of_view() -> None:
    fov = _fundus_fov()
    photo = photograph(np.zeros((*fov.shape, 3), dtype=np.uint8), fov)
    rng = np.random.default_rng(1)
    size, minimum = 64, 0.8
    fractions, centres = [], set()
    for _ in range(200):
        pair = place_pair(photo, rng, size, minimum)
        for placement in pair:
            y, x = (np.rint(c).astype(int) for c in _view_coordinates(placement, size))
            ok = (y >= 0) & (y < fov.shape[0]) & (x >= 0) & (x < fov.shape[1])
            fractions.append(np.count_nonzero(fov[y[ok], x[ok]]) / y.size)
            centres.add((placement.y, placement.x))
        first, second = pair
        assert abs(first.y - second.y) <= 2 * MAX_SHIFT * size
        assert abs(first.x - second.x) <= 2 * MAX_SHIFT * size
    assert min(fractions) >= minimum
    assert len(centres) > 390, "placements fell back to the FOV centre"
    # The check is conservative by a few pixels only: views still reach the rim.
    assert min(fractions) < 0.9


def test_a_crop_too_large_for_the_fov_falls_back_to_its_centre() -> None:
    fov = _fundus_fov()
    photo = photograph(np.zeros((*fov.shape, 3), dtype=np.uint8), fov)
    first, second = place_pair(photo, np.random.default_rng(0), 256, 0.9)
    assert (first.y, first.x) == (second.y, second.x) == photo.fov_centre
    assert abs(photo.fov_centre[0] - 106) <= 1 and abs(photo.fov_centre[1] - 160) <= 1


def test_views_keep_hue_and_colour() -> None:
    """Jitter changes brightness, contrast and saturation, never hue; nothing is greyscale."""
    image = np.broadcast_to(np.array(FUNDUS_RGB, dtype=np.uint8), (256, 256, 3))
    photo = photograph(image, np.ones((256, 256), dtype=bool))
    rng = np.random.default_rng(2)
    batch = default_collate([sample_view_pair(photo, rng, 64, 1.0) for _ in range(16)])
    red, green, blue = _unnormalise(render_pairs(batch, 64)).permute(1, 0, 2, 3)
    original = (FUNDUS_RGB[1] - FUNDUS_RGB[2]) / (FUNDUS_RGB[0] - FUNDUS_RGB[2])
    # red > green > blue: the hue is (green - blue) / (red - blue) of the red-yellow sixth.
    assert torch.allclose((green - blue) / (red - blue), torch.tensor(original), atol=1e-4)
    assert (red - blue).min() > 0.3
    brightness = red.mean(dim=(1, 2))
    assert brightness.std() > 0.02  # the views do differ in brightness ...
    assert ((brightness / (FUNDUS_RGB[0] / 255)).log().abs() < math.log(1.5)).all()  # mildly


def test_blur_has_the_drawn_sigma_per_view() -> None:
    impulse = torch.zeros(3, 3, 33, 33)
    impulse[:, :, 16, 16] = 1.0
    blurred = gaussian_blur(impulse, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(blurred[0], impulse[0])
    squares = (torch.arange(33.0) - 16) ** 2
    for view, sigma in ((1, 0.5), (2, 1.0)):
        assert blurred[view].sum().item() == pytest.approx(3.0, rel=1e-5)
        variance = (blurred[view, 0].sum(dim=0) * squares).sum().item()
        # A Gaussian sampled at whole pixels: sigma^2 once sigma is about 1 px, less below.
        taps = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
        assert variance == pytest.approx((taps * np.arange(-3, 4) ** 2).sum() / taps.sum())
        assert variance == pytest.approx(sigma**2, rel=0.15)


def test_pairs_overlap_and_differ() -> None:
    fov = _fundus_fov()
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (*fov.shape, 3), dtype=np.uint8) * fov[..., None]
    pair = sample_view_pair(photograph(image, fov), rng, 64, 0.8)
    assert pair.windows.shape == (2, window_side(64), window_side(64), 3)
    assert pair.windows.dtype == torch.uint8
    views = render_pairs(default_collate([pair]), 64)
    assert views.shape == (2, 3, 64, 64)
    assert not torch.allclose(views[0], views[1])


def test_stream_is_reproducible_for_a_seed() -> None:
    fov = _fundus_fov()
    image = np.random.default_rng(4).integers(0, 256, (*fov.shape, 3), dtype=np.uint8)
    photos: list[Photograph] = [photograph(image, fov)]

    def first(seed: tuple[int, ...], first_batch: int = 0) -> torch.Tensor:
        return next(iter(ViewPairStream(photos, 64, 0.8, seed, first_batch, 2))).windows

    assert torch.equal(first((0, 0)), first((0, 0)))
    assert not torch.equal(first((0, 0)), first((0, 1)))
    assert not torch.equal(first((0, 0)), first((0, 0), first_batch=12))


def test_crop_size_must_be_a_multiple_of_32() -> None:
    with pytest.raises(ValueError, match=r"pretrain\.crop_size = 100 is not a multiple of 32"):
        ViewPairStream([], 100, 0.8, (0,), 0, 2)
