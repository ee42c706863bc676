"""Training patches: the train split resident on the training device, lesion-centred
sampling and augmentation done there, a batch at a time.

Lesions are rare (DOMAIN.md: MA ~0.1% of pixels, SE in half of the photographs), so a
uniformly placed patch rarely shows one. A share of the patches (`foreground_fraction`) is
therefore centred on a lesion pixel of a class drawn by `class_sampling`, which gives the
rare classes more than their pixel share; the rest are centred anywhere in the field of view.

Every random draw of a batch comes from one generator keyed by (seed, rank, batch index)
(`batch_generator`): a resumed run continues the stream exactly, and distributed ranks draw
disjoint streams. Brightness and contrast are gains that keep channel ratios, i.e. hue, which
carries lesion identity (red haemorrhages, yellow exudates); only a small per-channel gain
changes them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from drseg.data import dataset
from drseg.models.normalize import IMAGE_MEAN, IMAGE_STD

ReconstructionInput = Literal["clean", "noised", "masked"]

NOISE_SIGMA = 0.1
"""Gaussian noise for the "noised" reconstruction input, in normalised (ImageNet std) units."""
MASK_BLOCK = 32
MASK_FRACTION = 0.25
"""The "masked" reconstruction input zeroes this share of MASK_BLOCK-pixel blocks."""
BRIGHTNESS = 0.1
CONTRAST = 0.1
CHANNEL_GAIN = 0.05
"""Colour jitter ranges: factors are drawn uniformly in 1 +- these."""
FOV_TRIES = 64


@dataclass(frozen=True)
class TrainImages:
    """The train split of a dataset folder, in memory.

    Photographs and masks are both stored channels-last, so one crop and one geometric
    function move both alike, and a photograph patch goes to image_to_tensor (which takes
    H x W x 3) without a transposing copy. `lesion_pixels[c]` lists every lesion pixel of
    class c in the split as rows (image index, y, x): sampling one is one random row.
    """

    ids: tuple[str, ...]
    classes: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    """(H, W, 3) uint8 RGB."""
    masks: tuple[np.ndarray, ...]
    """(H, W, C) bool, in `classes` order; a class without a mask file is all False."""
    fovs: tuple[np.ndarray, ...]
    """(H, W) bool field of view."""
    lesion_pixels: tuple[np.ndarray, ...]
    """Per class, (N, 3) int32 rows (image index, y, x)."""


def load_train_split(root: Path, classes: Sequence[str]) -> TrainImages:
    """Read every record of split "train" in the dataset folder `root`."""
    root = Path(root)
    manifest = dataset.load_manifest(root)
    records = [r for r in manifest.records if r.split == "train"]
    if not records:
        raise dataset.DatasetError(
            f"{root}: the manifest has no record in split 'train'; re-run ingest with "
            "ingest.val_fraction below 1"
        )
    images, masks, fovs = [], [], []
    lesions: list[list[np.ndarray]] = [[] for _ in classes]
    for index, record in enumerate(records):
        rgb = dataset.read_rgb(dataset.image_path(root, record.id))
        height, width = rgb.shape[:2]
        stack = np.zeros((height, width, len(classes)), dtype=bool)
        for c, cls in enumerate(classes):
            if cls in record.masks:
                stack[..., c] = _read_mask(dataset.mask_path(root, cls, record.id), rgb.shape)
            ys, xs = np.nonzero(stack[..., c])
            lesions[c].append(np.stack([np.full_like(ys, index), ys, xs], axis=1).astype(np.int32))
        images.append(rgb)
        masks.append(stack)
        fovs.append(_read_mask(dataset.fov_path(root, record.id), rgb.shape))
    pixels = tuple(np.concatenate(per_image) for per_image in lesions)
    absent = [cls for cls, rows in zip(classes, pixels, strict=True) if not len(rows)]
    if absent:
        # A class without one lesion pixel cannot be learnt, and its empty truth would make
        # every later number about it undefined: stop before hours of training.
        raise dataset.DatasetError(
            f"{root}: the train split ({len(records)} photographs) has no lesion pixel of "
            f"{', '.join(absent)}; add labelled photographs with those lesions, or remove the "
            "class from model.classes"
        )
    return TrainImages(
        ids=tuple(r.id for r in records),
        classes=tuple(classes),
        images=tuple(images),
        masks=tuple(masks),
        fovs=tuple(fovs),
        lesion_pixels=pixels,
    )


def _read_mask(path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
    mask = dataset.read_mask(path)
    if mask.shape != image_shape[:2]:
        raise dataset.DatasetError(
            f"{path}: mask of shape {mask.shape} for a photograph of shape {image_shape[:2]}; "
            "the dataset is inconsistent, re-run ingest"
        )
    return mask


def class_probabilities(data: TrainImages, class_sampling: Sequence[float]) -> np.ndarray:
    """`class_sampling` normalised to sum to 1 (zeros if all are 0: uniform centres only).
    Every class has lesion pixels: load_train_split refuses a split where one has none."""
    if len(class_sampling) != len(data.classes):
        raise ValueError(
            f"finetune.class_sampling has {len(class_sampling)} values for "
            f"{len(data.classes)} classes {data.classes}; give one value per class"
        )
    weights = np.asarray(class_sampling, dtype=np.float64)
    if (weights < 0).any():
        raise ValueError(f"finetune.class_sampling {tuple(class_sampling)} must be >= 0")
    total = weights.sum()
    return weights / total if total > 0 else weights


FOV_BIT = 7
"""Bit of ResidentImages.labels that holds the field of view; bits 0..6 hold lesion classes."""
MAX_CLASSES = FOV_BIT


@dataclass(frozen=True)
class ResidentImages:
    """The train split as tensors on the training device, so that a whole batch of patches is
    cut, turned and coloured there in a few batched operations instead of one patch at a time
    in DataLoader workers (which bounded a GPU's training speed at ~360 patches/s from 12
    workers; bench/RESULTS.md).

    Photographs are zero-padded to the largest one (and at least one patch), so one index
    expression reads any window; padding lies outside every field of view and mask.
    """

    images: Tensor
    """(N, H, W, 3) uint8 RGB."""
    labels: Tensor
    """(N, H, W) uint8: bit c is lesion class c, bit FOV_BIT the field of view."""
    sizes: Tensor
    """(N, 2) int64: each photograph's own height and width."""
    lesion_pixels: Tensor
    """(M, 3) int64 rows (image, y, x), every lesion pixel, class after class."""
    class_starts: Tensor
    """(C,) int64: each class's first row of `lesion_pixels`."""
    class_counts: Tensor
    """(C,) int64: each class's number of rows."""

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


def resident_images(data: TrainImages, device: torch.device | str, min_side: int) -> ResidentImages:
    """`data` packed into tensors on `device`, padded to at least `min_side` pixels a side."""
    if len(data.classes) > MAX_CLASSES:
        raise ValueError(
            f"{len(data.classes)} lesion classes {data.classes}: the training sampler packs at "
            f"most {MAX_CLASSES} classes into a byte per pixel"
        )
    height = max(min_side, *(image.shape[0] for image in data.images))
    width = max(min_side, *(image.shape[1] for image in data.images))
    images = np.zeros((len(data.images), height, width, 3), np.uint8)
    labels = np.zeros((len(data.images), height, width), np.uint8)
    bits = (1 << np.arange(len(data.classes))).astype(np.uint8)
    for index, (image, masks, fov) in enumerate(
        zip(data.images, data.masks, data.fovs, strict=True)
    ):
        h, w = image.shape[:2]
        images[index, :h, :w] = image
        labels[index, :h, :w] = (masks @ bits).astype(np.uint8) | (fov.astype(np.uint8) << FOV_BIT)
    counts = np.array([len(rows) for rows in data.lesion_pixels], np.int64)
    return ResidentImages(
        images=torch.from_numpy(images).to(device),
        labels=torch.from_numpy(labels).to(device),
        sizes=torch.tensor([image.shape[:2] for image in data.images], device=device),
        lesion_pixels=torch.from_numpy(np.concatenate(data.lesion_pixels).astype(np.int64)).to(
            device
        ),
        class_starts=torch.from_numpy(np.cumsum(counts) - counts).to(device),
        class_counts=torch.from_numpy(counts).to(device),
    )


def batch_generator(seed: Sequence[int], batch: int, device: torch.device | str) -> torch.Generator:
    """The random generator of batch number `batch` of the stream `seed` (e.g. (seed, rank)).

    Keyed by the batch, not by the batches before it: a run resumed at step k draws what an
    uninterrupted run draws from step k on, and the ranks of a distributed run, which put their
    rank in `seed`, draw disjoint streams.
    """
    state = np.random.SeedSequence([*seed, batch]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state >> np.uint64(1)))
    return generator


def _uniform(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


class Centres(NamedTuple):
    image: Tensor
    y: Tensor
    x: Tensor
    cls: Tensor
    """Index of the class whose lesion pixel (y, x) is; -1 for a uniform FOV centre."""


def choose_centres(
    data: ResidentImages,
    class_probs: Tensor,
    foreground_fraction: float,
    batch_size: int,
    generator: torch.Generator,
) -> Centres:
    """Per patch, a lesion pixel of a class drawn by `class_probs` (with probability
    `foreground_fraction`) or a field-of-view pixel of a photograph drawn uniformly.

    FOV pixels are found by rejection: the first of FOV_TRIES uniform candidates inside the
    FOV (the FOV covers about half a photograph, so all miss with probability ~2^-64);
    a photograph without FOV pixels gets its last candidate.
    """
    uniform = functools.partial(_uniform, generator)
    total = float(class_probs.sum())
    foreground = uniform(batch_size) < (foreground_fraction if total > 0 else 0.0)
    cumulative = torch.cumsum(class_probs / max(total, 1e-12), 0)
    cls = torch.searchsorted(cumulative, uniform(batch_size), right=True).clamp(
        max=data.num_classes - 1
    )
    counts = data.class_counts[cls]
    offset = (uniform(batch_size) * counts).long().minimum(counts - 1)
    lesion = data.lesion_pixels[data.class_starts[cls] + offset]

    image = (uniform(batch_size) * len(data.images)).long()
    size = data.sizes[image]
    ys = (uniform(batch_size, FOV_TRIES) * size[:, :1]).long()
    xs = (uniform(batch_size, FOV_TRIES) * size[:, 1:]).long()
    inside = (data.labels[image[:, None], ys, xs] >> FOV_BIT).bool()
    last = torch.full_like(image, FOV_TRIES - 1)
    first = torch.where(inside.any(1), inside.int().argmax(1), last)[:, None]
    return Centres(
        image=torch.where(foreground, lesion[:, 0], image),
        y=torch.where(foreground, lesion[:, 1], ys.gather(1, first)[:, 0]),
        x=torch.where(foreground, lesion[:, 2], xs.gather(1, first)[:, 0]),
        cls=torch.where(foreground, cls, -1),
    )


def patch_origins(centres: Tensor, lengths: Tensor, size: int) -> Tensor:
    """First row (or column) of `size` windows centred on `centres`, kept inside 0..length."""
    return (centres - size // 2).clamp(min=0).minimum((lengths - size).clamp(min=0))


def symmetry_grid(size: int, flip: Tensor, quarter_turns: Tensor) -> tuple[Tensor, Tensor]:
    """(B, size, size) source rows and columns in a window for each output pixel: mirror the
    columns (where `flip`), then rotate counter-clockwise by 90 degrees `quarter_turns`
    times (numpy's rot90). The eight symmetries of a square, applied by reading the window
    in another order, so photograph and masks move alike at no cost of their own."""
    device = flip.device
    i = torch.arange(size, device=device).view(1, size, 1).expand(len(flip), size, size)
    j = torch.arange(size, device=device).view(1, 1, size).expand(len(flip), size, size)
    last = size - 1
    turns = quarter_turns.view(-1, 1, 1)
    rows = torch.where(
        turns == 0, i, torch.where(turns == 1, j, torch.where(turns == 2, last - i, last - j))
    )
    cols = torch.where(
        turns == 0, j, torch.where(turns == 1, last - i, torch.where(turns == 2, last - j, i))
    )
    return rows, torch.where(flip.view(-1, 1, 1), last - cols, cols)


def jitter_colour(
    rgb: Tensor, brightness: Tensor, contrast: Tensor, channel_gain: Tensor
) -> Tensor:
    """(B, H, W, 3) 0..255 floats -> the same, with per-patch brightness (B,), contrast (B,)
    and per-channel gains (B, 3) applied, rounded to whole grey levels as a photograph's are.

    Contrast stretches luminance around its mean over the non-black pixels (the FOV), and is
    applied as a per-pixel gain on all three channels, so channel ratios (hue), which carry
    lesion identity (red haemorrhages, yellow exudates), stay as they are; only the small
    per-channel gains change them. Black stays black.
    """
    luminance = rgb.mean(-1)
    lit = luminance > 0
    mean = luminance.sum((1, 2)) / lit.sum((1, 2)).clamp(min=1)
    mean = mean.view(-1, 1, 1)
    stretched = (mean + contrast.view(-1, 1, 1) * (luminance - mean)).clamp(min=0)
    gain = torch.where(lit, stretched / luminance.clamp(min=1e-6), 1.0) * brightness.view(-1, 1, 1)
    out = rgb * gain[..., None] * channel_gain.view(-1, 1, 1, 3)
    return out.clamp(0, 255).add(0.5).floor()


def normalise(rgb: Tensor) -> Tensor:
    """(B, H, W, 3) 0..255 -> (B, 3, H, W) as image_to_tensor normalises, channels-last in
    memory (the permuted view of an NHWC tensor), which bf16 convolutions want."""
    mean = torch.tensor(IMAGE_MEAN, device=rgb.device) * 255
    std = torch.tensor(IMAGE_STD, device=rgb.device) * 255
    return ((rgb - mean) / std).permute(0, 3, 1, 2)


def corrupt(images: Tensor, mode: ReconstructionInput, generator: torch.Generator) -> Tensor:
    """The reconstruction head's input for `mode`; the target is always `images` itself.

    "noised": Gaussian noise of std NOISE_SIGMA (normalised units); "masked": a random
    MASK_FRACTION of the MASK_BLOCK-pixel squares of each patch set to 0 (the mean colour).
    """
    if mode == "noised":
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        return images + NOISE_SIGMA * noise
    if mode == "masked":
        batch, _, height, width = images.shape
        blocks = _uniform(generator, batch, 1, -(-height // MASK_BLOCK), -(-width // MASK_BLOCK))
        keep = (blocks >= MASK_FRACTION).repeat_interleave(MASK_BLOCK, 2)
        keep = keep.repeat_interleave(MASK_BLOCK, 3)[..., :height, :width]
        return images * keep
    return images


class Patch(NamedTuple):
    image: Tensor
    """(B, 3, P, P) normalised photograph patches (also the reconstruction target)."""
    masks: Tensor
    """(B, C, P, P) 0/1 float."""
    reconstruction_input: Tensor
    """(B, 3, P, P): `image` itself for "clean", else its noised or masked copy."""


@dataclass(frozen=True)
class PatchSampling:
    """What the sampler needs from the fine-tune settings."""

    patch_size: int
    batch_size: int
    foreground_fraction: float
    class_probs: np.ndarray
    reconstruction_input: ReconstructionInput


def sample_batch(
    data: ResidentImages, sampling: PatchSampling, generator: torch.Generator
) -> Patch:
    """One batch of augmented training patches, on data's device: centres, jittered windows,
    flips/rotations, colour jitter, the reconstruction input."""
    batch, size = sampling.batch_size, sampling.patch_size
    uniform = functools.partial(_uniform, generator)
    probs = torch.as_tensor(sampling.class_probs, dtype=torch.float32, device=generator.device)
    centres = choose_centres(data, probs, sampling.foreground_fraction, batch, generator)
    jitter = size // 8
    shift = (uniform(2, batch) * (2 * jitter + 1)).long() - jitter
    lengths = data.sizes[centres.image]
    y0 = patch_origins(centres.y + shift[0], lengths[:, 0], size)
    x0 = patch_origins(centres.x + shift[1], lengths[:, 1], size)
    rows, cols = symmetry_grid(size, uniform(batch) < 0.5, (uniform(batch) * 4).long())
    where = (centres.image.view(-1, 1, 1), y0.view(-1, 1, 1) + rows, x0.view(-1, 1, 1) + cols)
    labels = data.labels[where]
    bits = torch.arange(data.num_classes, device=labels.device).view(1, -1, 1, 1)
    masks = ((labels[:, None] >> bits) & 1).float()
    rgb = jitter_colour(
        data.images[where].float(),
        brightness=1 + BRIGHTNESS * (2 * uniform(batch) - 1),
        contrast=1 + CONTRAST * (2 * uniform(batch) - 1),
        channel_gain=1 + CHANNEL_GAIN * (2 * uniform(batch, 3) - 1),
    )
    image = normalise(rgb)
    return Patch(image, masks, corrupt(image, sampling.reconstruction_input, generator))
