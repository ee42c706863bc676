import itertools
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drseg.config import LESION_CLASSES
from drseg.data import dataset
from drseg.data.dataset import Manifest, MaskEntry, RecordEntry
from drseg.models.normalize import image_to_tensor, tensor_to_image
from drseg.train.patches import (
    FOV_BIT,
    MASK_BLOCK,
    NOISE_SIGMA,
    PatchSampling,
    ResidentImages,
    TrainImages,
    batch_generator,
    choose_centres,
    class_probabilities,
    corrupt,
    jitter_colour,
    load_train_split,
    normalise,
    patch_origins,
    resident_images,
    sample_batch,
    symmetry_grid,
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


@pytest.fixture(scope="module")
def resident(data: TrainImages) -> ResidentImages:
    return resident_images(data, "cpu", min_side=64)


def _sampling(data: TrainImages, **changes: object) -> PatchSampling:
    settings: dict[str, object] = {
        "patch_size": 64,
        "batch_size": 100,
        "foreground_fraction": 0.6,
        "class_probs": class_probabilities(data, (0.35, 0.25, 0.2, 0.2)),
        "reconstruction_input": "clean",
    }
    settings.update(changes)
    return PatchSampling(**settings)  # type: ignore[arg-type]


def _generator(seed: int = 0, batch: int = 0) -> torch.Generator:
    return batch_generator((seed, 0), batch, "cpu")


def test_resident_images_pack_masks_and_fov_bits(
    data: TrainImages, resident: ResidentImages
) -> None:
    assert resident.images.shape == (3, H, W, 3) and resident.images.dtype == torch.uint8
    for index in range(3):
        labels = resident.labels[index].numpy()
        assert np.array_equal(resident.images[index].numpy(), data.images[index])
        assert np.array_equal((labels >> FOV_BIT) & 1, data.fovs[index])
        for c in range(4):
            assert np.array_equal((labels >> c) & 1, data.masks[index][..., c])
    rows = resident.lesion_pixels.numpy()
    for c in range(4):
        start, count = int(resident.class_starts[c]), int(resident.class_counts[c])
        assert np.array_equal(rows[start : start + count], data.lesion_pixels[c])


def test_small_photographs_are_padded_to_a_patch(data: TrainImages) -> None:
    padded = resident_images(data, "cpu", min_side=160)
    assert padded.images.shape[1:3] == (160, 160)
    assert not padded.images[:, H:].any() and not padded.labels[:, :, W:].any()
    assert padded.sizes.tolist() == [[H, W]] * 3


def test_foreground_centres_are_lesion_pixels_of_the_chosen_class(
    data: TrainImages, resident: ResidentImages
) -> None:
    probs = torch.tensor(class_probabilities(data, (0.35, 0.25, 0.2, 0.2)), dtype=torch.float32)
    centres = choose_centres(resident, probs, 1.0, 500, _generator())
    assert (centres.cls >= 0).all()
    for image, y, x, cls in zip(*(t.tolist() for t in centres), strict=True):
        assert data.masks[image][y, x, cls]


def test_rare_class_is_sampled_in_its_requested_share(
    data: TrainImages, resident: ResidentImages
) -> None:
    probs = torch.tensor(class_probabilities(data, (0.1, 0.1, 0.1, 0.7)), dtype=torch.float32)
    centres = choose_centres(resident, probs, 1.0, 3000, _generator(1))
    assert (centres.cls == 3).float().mean().item() == pytest.approx(0.7, abs=0.04)
    assert (centres.cls == 0).float().mean().item() == pytest.approx(0.1, abs=0.03)


def test_foreground_share_follows_the_setting(data: TrainImages, resident: ResidentImages) -> None:
    probs = torch.full((4,), 0.25)
    centres = choose_centres(resident, probs, 0.6, 3000, _generator(2))
    assert (centres.cls >= 0).float().mean().item() == pytest.approx(0.6, abs=0.04)


def test_background_centres_are_in_the_field_of_view(
    data: TrainImages, resident: ResidentImages
) -> None:
    centres = choose_centres(resident, torch.full((4,), 0.25), 0.0, 300, _generator(3))
    assert (centres.cls == -1).all()
    assert all(
        data.fovs[i][y, x]
        for i, y, x in zip(
            centres.image.tolist(), centres.y.tolist(), centres.x.tolist(), strict=True
        )
    )
    assert set(centres.image.tolist()) == {0, 1, 2}


def test_foreground_patches_always_show_a_lesion(
    data: TrainImages, resident: ResidentImages
) -> None:
    patch = sample_batch(resident, _sampling(data, foreground_fraction=1.0), _generator(4))
    assert patch.image.shape == (100, 3, 64, 64) and patch.image.dtype == torch.float32
    assert patch.image.is_contiguous(memory_format=torch.channels_last)
    assert patch.masks.shape == (100, 4, 64, 64)
    assert (patch.masks.sum((1, 2, 3)) >= 1).all()


def test_masks_move_with_the_photograph(data: TrainImages, resident: ResidentImages) -> None:
    patch = sample_batch(resident, _sampling(data, foreground_fraction=0.8), _generator(5))
    lesion_patches = 0
    for image, masks in zip(patch.image, patch.masks, strict=True):
        painted = tensor_to_image(image)[..., 1] > 150
        assert np.array_equal(painted, masks.sum(0).numpy() > 0)
        lesion_patches += bool(painted.any())
    assert lesion_patches >= 70


def test_window_stays_inside_the_photograph() -> None:
    centres = torch.tensor([5, 50, 98, 10])
    lengths = torch.tensor([100, 100, 100, 20])
    assert patch_origins(centres, lengths, 32).tolist() == [0, 34, 68, 0]


def test_symmetry_grid_gives_numpys_eight_symmetries() -> None:
    """Reading a window through the grid equals flipping its columns, then np.rot90."""
    window = np.arange(25).reshape(5, 5)
    flips = torch.tensor([False, True] * 4)
    turns = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    rows, cols = symmetry_grid(5, flips, turns)
    seen = set()
    for flip, k, r, c in zip(flips.tolist(), turns.tolist(), rows, cols, strict=True):
        expected = np.rot90(window[:, ::-1] if flip else window, k)
        assert np.array_equal(window[r.numpy(), c.numpy()], expected)
        seen.add(expected.tobytes())
    assert len(seen) == 8


def _jitter(image: np.ndarray, brightness: float, contrast: float, gains: tuple) -> np.ndarray:
    out = jitter_colour(
        torch.from_numpy(image).float()[None],
        torch.tensor([brightness]),
        torch.tensor([contrast]),
        torch.tensor([gains]),
    )
    return out[0].numpy()


def test_colour_jitter_is_multiplicative_and_keeps_hue() -> None:
    rng = np.random.default_rng(5)
    image = (rng.uniform(0.8, 1.2, (40, 40, 3)) * np.array(BACKGROUND)).astype(np.uint8)
    assert np.array_equal(_jitter(image, 1.0, 1.0, (1.0, 1.0, 1.0)), image)
    brighter = _jitter(image, 1.1, 1.0, (1.0, 1.0, 1.0))
    assert np.abs(brighter - image * 1.1).max() <= 0.5 + 1e-4
    gains = _jitter(image, 1.0, 1.0, (1.05, 1.0, 0.95))
    assert np.abs(gains[..., 2] - image[..., 2] * 0.95).max() <= 0.5 + 1e-4
    assert np.array_equal(gains[..., 1], image[..., 1])

    def ratios(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.float64)
        return np.stack([rgb[..., 0] / rgb[..., 1], rgb[..., 1] / rgb[..., 2]])

    contrast = _jitter(image, 1.0, 1.1, (1.0, 1.0, 1.0))
    # Luminance (channel mean) deviations from its mean are stretched by exactly the factor.
    assert contrast.mean(-1).std() == pytest.approx(1.1 * image.mean(-1).std(), rel=0.02)
    # Contrast alone keeps channel ratios up to rounding (blue is ~20 grey levels: 0.5/20).
    assert np.allclose(ratios(contrast), ratios(image), rtol=0.06)
    black = np.zeros((4, 4, 3), np.uint8)
    assert not _jitter(black, 1.1, 1.1, (1.05, 1.05, 1.05)).any()


def test_normalise_matches_the_serving_input() -> None:
    rgb = np.random.default_rng(6).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    batched = normalise(torch.from_numpy(rgb).float())
    for image, expected in zip(batched, rgb, strict=True):
        assert torch.allclose(image, image_to_tensor(expected), atol=1e-5)


def test_reconstruction_inputs() -> None:
    generator = _generator(6)
    image = torch.randn(2, 3, 256, 256)
    assert corrupt(image, "clean", generator) is image
    noised = corrupt(image, "noised", generator)
    assert (noised - image).std().item() == pytest.approx(NOISE_SIGMA, rel=0.05)
    masked = corrupt(image, "masked", generator)
    for one, kept in zip(masked, image, strict=True):
        zeroed = (one == 0).all(dim=0)
        blocks = zeroed.reshape(8, MASK_BLOCK, 8, MASK_BLOCK).permute(0, 2, 1, 3).reshape(64, -1)
        assert bool((blocks.all(dim=1) | ~blocks.any(dim=1)).all()), "whole blocks, aligned"
        assert 0.1 <= zeroed.float().mean().item() <= 0.4
        assert torch.equal(one[:, ~zeroed], kept[:, ~zeroed])
    assert not torch.equal((masked[0] == 0).all(0), (masked[1] == 0).all(0))


def test_batch_keeps_the_clean_image_as_reconstruction_target(
    data: TrainImages, resident: ResidentImages
) -> None:
    patch = sample_batch(resident, _sampling(data, reconstruction_input="masked"), _generator(7))
    assert not torch.equal(patch.reconstruction_input, patch.image)
    kept = (patch.reconstruction_input != 0).any(dim=1, keepdim=True).expand_as(patch.image)
    assert torch.equal(patch.reconstruction_input[kept], patch.image[kept])


def _batches(
    data: TrainImages, resident: ResidentImages, seed: tuple[int, int], first: int, count: int
) -> list[torch.Tensor]:
    sampling = _sampling(data, batch_size=4)
    return [
        sample_batch(resident, sampling, batch_generator(seed, b, "cpu")).image
        for b in range(first, first + count)
    ]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_stream_is_deterministic_for_a_seed(data: TrainImages, resident: ResidentImages) -> None:
    a, b = _batches(data, resident, (0, 0), 0, 3), _batches(data, resident, (0, 0), 0, 3)
    assert _same(a, b)
    assert not any(torch.equal(x, y) for x, y in itertools.pairwise(a))


def test_resumed_stream_continues_the_uninterrupted_one(
    data: TrainImages, resident: ResidentImages
) -> None:
    uninterrupted = _batches(data, resident, (0, 0), 0, 5)
    assert _same(_batches(data, resident, (0, 0), 3, 2), uninterrupted[3:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_stream(rank: int, world: int, port: int, root: Path, out: Path) -> None:
    """One process of a 2-process gloo group: draws its rank's first batches as the
    fine-tune module does (seed (0, rank)) and saves them with the other rank's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = load_train_split(root, LESION_CLASSES)
        resident = resident_images(data, "cpu", min_side=64)
        mine = torch.stack(_batches(data, resident, (0, dist.get_rank()), 0, 3))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def _distributed_streams(root: Path, out: Path) -> list[torch.Tensor]:
    mp.start_processes(
        _rank_stream, args=(2, _free_port(), root, out), nprocs=2, start_method="spawn"
    )
    streams: list[torch.Tensor] = torch.load(out)
    return streams


def test_ranks_of_a_distributed_run_draw_disjoint_reproducible_streams(
    root: Path, tmp_path: Path, data: TrainImages, resident: ResidentImages
) -> None:
    """Two real processes in a gloo group (CPU; the GPU's NCCL cannot run here): each rank
    draws a different stream, the same on a second launch, and rank 0's is the
    single-process stream."""
    first = _distributed_streams(root, tmp_path / "a.pt")
    second = _distributed_streams(root, tmp_path / "b.pt")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    rank0, rank1 = first
    assert not any(torch.equal(x, y) for x in rank0 for y in rank1)
    assert torch.equal(rank0, torch.stack(_batches(data, resident, (0, 0), 0, 3)))
