import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from drseg.config import LESION_CLASSES
from drseg.data import dataset
from drseg.data.dataset import Manifest, MaskEntry, RecordEntry
from drseg.models.normalize import tensor_to_image
from drseg.train.patches import (
    MASK_BLOCK,
    NOISE_SIGMA,
    PatchSampling,
    PatchStream,
    TrainImages,
    choose_centre,
    class_probabilities,
    corrupt,
    crop,
    flip_rotate,
    jitter_colour,
    load_train_split,
    patch_origin,
    random_colour_jitter,
    sample_patch,
)

H, W = 96, 128
BACKGROUND = (150, 60, 20)
MARKER_GREEN = 250
"""Lesion pixels are painted with this green, far above the background's 60: after colour
jitter a pixel is still a lesion pixel iff its green is over 150."""


def _record(root: Path, record_id: str, split: str, lesions: dict[str, list[tuple[int, int]]]):
    """Write one photograph whose lesions are 3x3 squares at the given (y, x) centres."""
    yy, xx = np.mgrid[:H, :W]
    fov = (yy - H / 2) ** 2 + (xx - W / 2) ** 2 < (0.45 * W) ** 2
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[fov] = BACKGROUND
    masks: dict[str, MaskEntry] = {}
    for cls, centres in lesions.items():
        mask = np.zeros((H, W), bool)
        for y, x in centres:
            mask[y - 1 : y + 2, x - 1 : x + 2] = True
        rgb[mask, 1] = MARKER_GREEN
        dataset.write_mask(dataset.mask_path(root, cls, record_id), mask)
        masks[cls] = MaskEntry(source=f"{cls}/{record_id}.png", sha256="0", pixels=int(mask.sum()))
    dataset.write_image(dataset.image_path(root, record_id), rgb)
    dataset.write_mask(dataset.fov_path(root, record_id), fov)
    return RecordEntry(
        id=record_id,
        source=f"{record_id}.jpg",
        sha256="0",
        source_size=(W, H),
        size=(W, H),
        masks=masks,
        split=split,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three train photographs (one without any SE mask file) and one val photograph.
    MA and SE in one photograph each, HE and EX in two."""
    out = tmp_path_factory.mktemp("patches")
    records = [
        _record(
            out, "a", "train", {"MA": [(70, 100)], "HE": [(30, 40)], "EX": [(50, 60), (52, 90)]}
        ),
        _record(out, "b", "train", {"HE": [(70, 70)], "EX": [(40, 30)], "SE": [(20, 64)]}),
        _record(out, "c", "train", {"SE": []}),
        _record(out, "v", "val", {"MA": [(48, 64)]}),
    ]
    manifest = Manifest(
        stage="ingest",
        dataset_hash="test",
        classes=(*LESION_CLASSES, "OD"),
        params={},
        records=tuple(records),
    )
    dataset.write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def data(root: Path) -> TrainImages:
    return load_train_split(root, LESION_CLASSES)


def _sampling(data: TrainImages, **changes: object) -> PatchSampling:
    settings: dict[str, object] = {
        "patch_size": 64,
        "foreground_fraction": 0.6,
        "class_probs": class_probabilities(data, (0.35, 0.25, 0.2, 0.2)),
        "reconstruction_input": "clean",
    }
    settings.update(changes)
    return PatchSampling(**settings)  # type: ignore[arg-type]


def test_loads_the_train_split_with_missing_masks_all_negative(data: TrainImages) -> None:
    assert data.ids == ("a", "b", "c")
    assert data.classes == LESION_CLASSES
    assert data.images[0].shape == (H, W, 3) and data.images[0].dtype == np.uint8
    assert data.masks[0].shape == (H, W, 4) and data.masks[0].dtype == bool
    assert not data.masks[0][..., 3].any(), "photograph a has no SE mask file: all negative"
    assert [m.sum(axis=(0, 1)).tolist() for m in data.masks] == [
        [9, 9, 18, 0],
        [0, 9, 9, 9],
        [0, 0, 0, 0],
    ]
    assert [len(rows) for rows in data.lesion_pixels] == [9, 18, 27, 9]
    for cls, rows in enumerate(data.lesion_pixels):
        for image, y, x in rows:
            assert data.masks[image][y, x, cls]
    assert data.images[1][20, 64, 1] == MARKER_GREEN  # the SE square of b


def test_a_train_split_without_pixels_of_a_class_is_refused(tmp_path: Path) -> None:
    """Fine-tuning cannot learn a class it never sees: it fails before training, not after."""
    record = _record(tmp_path, "a", "train", {"HE": [(30, 40)], "EX": [(50, 60)]})
    manifest = Manifest(
        stage="ingest", dataset_hash="t", classes=LESION_CLASSES, params={}, records=(record,)
    )
    dataset.write_manifest(tmp_path, manifest)
    with pytest.raises(dataset.DatasetError, match=r"no lesion pixel of MA, SE; add labelled"):
        load_train_split(tmp_path, LESION_CLASSES)


def test_class_sampling_is_normalised(data: TrainImages) -> None:
    probs = class_probabilities(data, (2.0, 1.0, 1.0, 0.0))
    assert probs == pytest.approx([0.5, 0.25, 0.25, 0.0])
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        class_probabilities(data, (1.0, 1.0, 1.0))


def test_foreground_centres_are_lesion_pixels_of_the_chosen_class(data: TrainImages) -> None:
    rng = np.random.default_rng(0)
    probs = class_probabilities(data, (0.35, 0.25, 0.2, 0.2))
    for _ in range(300):
        centre = choose_centre(data, rng, 1.0, probs)
        assert centre.cls is not None
        assert data.masks[centre.image][centre.y, centre.x, centre.cls]


def test_rare_class_is_sampled_in_its_requested_share(data: TrainImages) -> None:
    rng = np.random.default_rng(1)
    probs = class_probabilities(data, (0.1, 0.1, 0.1, 0.7))
    n = 3000
    chosen = [choose_centre(data, rng, 1.0, probs).cls for _ in range(n)]
    # SE holds 9 of the 63 lesion pixels, yet is chosen 70% of the time (+-4 sigma).
    assert chosen.count(3) / n == pytest.approx(0.7, abs=0.034)
    assert chosen.count(0) / n == pytest.approx(0.1, abs=0.022)


def test_background_centres_are_in_the_field_of_view(data: TrainImages) -> None:
    rng = np.random.default_rng(2)
    centres = [choose_centre(data, rng, 0.0, np.full(4, 0.25)) for _ in range(300)]
    assert all(c.cls is None and data.fovs[c.image][c.y, c.x] for c in centres)
    assert {c.image for c in centres} == {0, 1, 2}


def test_foreground_patches_always_show_a_lesion(data: TrainImages) -> None:
    rng = np.random.default_rng(3)
    sampling = _sampling(data, foreground_fraction=1.0)
    for _ in range(100):
        patch = sample_patch(data, rng, sampling)
        assert patch.image.shape == (3, 64, 64) and patch.image.dtype == torch.float32
        assert patch.masks.shape == (4, 64, 64)
        assert patch.masks.sum() >= 1


def test_masks_move_with_the_photograph(data: TrainImages) -> None:
    rng = np.random.default_rng(4)
    sampling = _sampling(data, foreground_fraction=0.8)
    lesion_patches = 0
    for _ in range(100):
        patch = sample_patch(data, rng, sampling)
        rgb = tensor_to_image(patch.image)
        painted = rgb[..., 1] > 150
        assert np.array_equal(painted, patch.masks.sum(0).numpy() > 0)
        lesion_patches += bool(painted.any())
    assert lesion_patches >= 70


def test_window_stays_inside_and_pads_small_images() -> None:
    assert patch_origin(5, 100, 32) == 0
    assert patch_origin(50, 100, 32) == 34
    assert patch_origin(98, 100, 32) == 68
    assert patch_origin(10, 20, 32) == 0
    image = np.arange(20 * 30 * 2, dtype=np.int32).reshape(20, 30, 2) + 1
    window = crop(image, 0, 0, 32)
    assert window.shape == (32, 32, 2)
    assert np.array_equal(window[:20, :30], image)
    assert not window[20:].any() and not window[:, 30:].any()
    assert np.array_equal(crop(image, 4, 6, 8), image[4:12, 6:14])


def test_flip_rotate_gives_the_eight_symmetries_and_moves_arrays_alike() -> None:
    square = np.arange(9).reshape(3, 3, 1)
    results = {flip_rotate(square, f, k).tobytes() for f in (False, True) for k in range(4)}
    assert len(results) == 8
    flipped = flip_rotate(square, True, 0)[..., 0]
    assert np.array_equal(flipped, [[2, 1, 0], [5, 4, 3], [8, 7, 6]])
    turned = flip_rotate(square, False, 1)[..., 0]
    assert np.array_equal(turned, [[2, 5, 8], [1, 4, 7], [0, 3, 6]])


def test_colour_jitter_is_multiplicative_and_keeps_hue(data: TrainImages) -> None:
    rng = np.random.default_rng(5)
    image = (rng.uniform(0.8, 1.2, (40, 40, 3)) * np.array(BACKGROUND)).astype(np.uint8)
    assert np.array_equal(jitter_colour(image, 1.0, 1.0, (1.0, 1.0, 1.0)), image)
    brighter = jitter_colour(image, 1.1, 1.0, (1.0, 1.0, 1.0))
    assert np.abs(brighter - image * 1.1).max() <= 0.5 + 1e-4
    gains = jitter_colour(image, 1.0, 1.0, (1.05, 1.0, 0.95))
    assert np.abs(gains[..., 2] - image[..., 2] * 0.95).max() <= 0.5 + 1e-4
    assert np.array_equal(gains[..., 1], image[..., 1])

    def ratios(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.float64)
        return np.stack([rgb[..., 0] / rgb[..., 1], rgb[..., 1] / rgb[..., 2]])

    contrast = jitter_colour(image, 1.0, 1.1, (1.0, 1.0, 1.0))
    # Luminance (channel mean) deviations from its mean are stretched by exactly the factor.
    assert contrast.mean(-1).std() == pytest.approx(1.1 * image.mean(-1).std(), rel=0.02)
    # Contrast alone keeps channel ratios up to rounding (blue is ~20 grey levels: 0.5/20).
    assert np.allclose(ratios(contrast), ratios(image), rtol=0.06)
    for _ in range(20):
        # Per-channel gains of +-5% move a ratio by at most ~10%, plus rounding.
        jittered = random_colour_jitter(image, rng)
        assert np.allclose(ratios(jittered), ratios(image), rtol=0.16)
    black = np.zeros((4, 4, 3), np.uint8)
    assert not jitter_colour(black, 1.1, 1.1, (1.05, 1.05, 1.05)).any()


def test_reconstruction_inputs() -> None:
    rng = np.random.default_rng(6)
    image = torch.randn(3, 256, 256)
    assert corrupt(image, "clean", rng) is image
    noised = corrupt(image, "noised", rng)
    assert (noised - image).std().item() == pytest.approx(NOISE_SIGMA, rel=0.05)
    masked = corrupt(image, "masked", rng)
    zeroed = (masked == 0).all(dim=0)
    blocks = zeroed.reshape(8, MASK_BLOCK, 8, MASK_BLOCK).permute(0, 2, 1, 3).reshape(64, -1)
    assert bool((blocks.all(dim=1) | ~blocks.any(dim=1)).all()), "whole blocks, aligned"
    assert 0.1 <= zeroed.float().mean().item() <= 0.4
    assert torch.equal(masked[:, ~zeroed], image[:, ~zeroed])


def test_patch_keeps_the_clean_image_as_reconstruction_target(data: TrainImages) -> None:
    rng = np.random.default_rng(7)
    sampling = _sampling(data, reconstruction_input="masked")
    patches = [sample_patch(data, rng, sampling) for _ in range(10)]
    assert any(not torch.equal(p.reconstruction_input, p.image) for p in patches)
    for patch in patches:
        kept = (patch.reconstruction_input != 0).any(dim=0)
        assert torch.equal(patch.reconstruction_input[:, kept], patch.image[:, kept])


def _batches(
    data: TrainImages, seed: tuple[int, ...], first_batch: int, batches: int, workers: int = 0
) -> list[torch.Tensor]:
    stream = PatchStream(data, _sampling(data), seed, first_batch, batch_size=4)
    loader = iter(DataLoader(stream, batch_size=4, num_workers=workers))
    return [next(loader).image for _ in range(batches)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_stream_is_deterministic_for_a_seed(data: TrainImages) -> None:
    a, b = _batches(data, (0, 0), 0, 3), _batches(data, (0, 0), 0, 3)
    assert _same(a, b)
    assert not any(torch.equal(x, y) for x, y in itertools.pairwise(a))


def test_stream_is_the_same_for_any_number_of_workers(data: TrainImages) -> None:
    """Two workers make alternate batches; together they give the one-process stream."""
    assert _same(_batches(data, (0, 0), 0, 4, workers=2), _batches(data, (0, 0), 0, 4))


def test_resumed_stream_continues_the_uninterrupted_one(data: TrainImages) -> None:
    uninterrupted = _batches(data, (0, 0), 0, 5)
    assert _same(_batches(data, (0, 0), 3, 2), uninterrupted[3:])


def test_ranks_draw_different_streams(data: TrainImages) -> None:
    """A distributed run puts its rank in the seed: no rank repeats another's patches."""
    rank0, rank1 = _batches(data, (0, 0), 0, 3), _batches(data, (0, 1), 0, 3)
    assert not any(torch.equal(x, y) for x in rank0 for y in rank1)
