"""Training patches: the train split in memory, lesion-centred sampling, augmentation.

Lesions are rare (DOMAIN.md: MA ~0.1% of pixels, SE in half of the photographs), so a
uniformly placed patch rarely shows one. A share of the patches (`foreground_fraction`) is
therefore centred on a lesion pixel of a class drawn by `class_sampling`, which gives the
rare classes more than their pixel share; the rest are centred anywhere in the field of view.

The augmentation functions are plain array/tensor functions with their random draws passed
in or drawn from an explicit numpy Generator, so each is testable on its own. Brightness and
contrast are gains that keep channel ratios, i.e. hue, which carries lesion identity (red
haemorrhages, yellow exudates); only a small per-channel gain changes them. Worker processes
run no OpenCV code (see parallel.py on why that matters for forked workers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from drseg.data import dataset
from drseg.models.normalize import image_to_tensor
from drseg.train.streams import item_generators

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
_FOV_TRIES = 64


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


class PatchCentre(NamedTuple):
    image: int
    y: int
    x: int
    cls: int | None
    """Index of the class whose lesion pixel (y, x) is; None for a uniform FOV centre."""


def choose_centre(
    data: TrainImages, rng: np.random.Generator, foreground_fraction: float, probs: np.ndarray
) -> PatchCentre:
    """A lesion pixel (with probability `foreground_fraction`) or a field-of-view pixel."""
    if probs.sum() > 0 and rng.random() < foreground_fraction:
        cls = int(rng.choice(len(probs), p=probs))
        rows = data.lesion_pixels[cls]
        image, y, x = rows[rng.integers(len(rows))]
        return PatchCentre(int(image), int(y), int(x), cls)
    image = int(rng.integers(len(data.images)))
    fov = data.fovs[image]
    # Rejection sampling: the FOV covers about half the photograph. A photograph without
    # FOV pixels ends up with a uniform centre.
    for _ in range(_FOV_TRIES):
        y, x = int(rng.integers(fov.shape[0])), int(rng.integers(fov.shape[1]))
        if fov[y, x]:
            break
    return PatchCentre(image, y, x, None)


def patch_origin(centre: int, length: int, size: int) -> int:
    """First row (or column) of a `size` window centred on `centre`, kept inside 0..length."""
    return min(max(centre - size // 2, 0), max(length - size, 0))


def crop(array: np.ndarray, y0: int, x0: int, size: int) -> np.ndarray:
    """(H, W, ...) -> (size, size, ...) window at (y0, x0), zero-padded where H or W < size."""
    window = array[y0 : y0 + size, x0 : x0 + size]
    pad = [(0, size - window.shape[0]), (0, size - window.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(window, pad) if pad[0][1] or pad[1][1] else window


def flip_rotate(array: np.ndarray, flip: bool, quarter_turns: int) -> np.ndarray:
    """Mirror columns (if `flip`), then rotate by 90 degrees k times: a view of (H, W, ...).

    The two together give all eight symmetries of a square patch.
    """
    if flip:
        array = array[:, ::-1]
    return np.rot90(array, quarter_turns, axes=(0, 1))


def jitter_colour(
    image: np.ndarray, brightness: float, contrast: float, channel_gain: Sequence[float]
) -> np.ndarray:
    """(H, W, 3) uint8 -> uint8 with brightness, contrast and per-channel gains applied.

    Contrast stretches luminance around its mean over the non-black pixels (the FOV), and is
    applied as a per-pixel gain on all three channels, so channel ratios (hue) stay as they
    are; only the per-channel gains, kept small, change them. Black stays black.
    """
    rgb = np.ascontiguousarray(image, dtype=np.float32)  # a flipped view would be slow below
    luminance = rgb @ np.full(3, 1 / 3, dtype=np.float32)  # 20x faster than mean(axis=-1)
    lit = luminance > 0
    mean = luminance.sum() / max(np.count_nonzero(lit), 1)  # black adds nothing to the sum
    stretched = np.maximum(mean + contrast * (luminance - mean), 0.0)
    gain = np.divide(stretched, luminance, out=np.ones_like(luminance), where=lit) * brightness
    rgb *= gain[..., None]
    rgb *= np.asarray(channel_gain, dtype=np.float32)
    np.clip(rgb, 0, 255, out=rgb)
    return (rgb + 0.5).astype(np.uint8)  # rounds half up; np.rint is 8x slower


def random_colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """jitter_colour with factors drawn in 1 +- BRIGHTNESS, CONTRAST and CHANNEL_GAIN."""
    return jitter_colour(
        image,
        brightness=float(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)),
        contrast=float(rng.uniform(1 - CONTRAST, 1 + CONTRAST)),
        channel_gain=rng.uniform(1 - CHANNEL_GAIN, 1 + CHANNEL_GAIN, size=3).tolist(),
    )


def add_noise(image: Tensor, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> Tensor:
    """Gaussian noise of std `sigma` (normalised units) added to a (3, H, W) tensor."""
    noise = rng.standard_normal(tuple(image.shape), dtype=np.float32)
    return image + sigma * torch.from_numpy(noise)


def mask_blocks(
    image: Tensor,
    rng: np.random.Generator,
    block: int = MASK_BLOCK,
    fraction: float = MASK_FRACTION,
) -> Tensor:
    """Set a random `fraction` of `block`-pixel squares to 0 (the ImageNet mean colour)."""
    height, width = image.shape[-2:]
    keep = torch.from_numpy(rng.random((-(-height // block), -(-width // block))) >= fraction)
    keep = keep.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return image * keep[:height, :width]


def corrupt(image: Tensor, mode: ReconstructionInput, rng: np.random.Generator) -> Tensor:
    """The reconstruction head's input for `mode`; the target is always `image` itself."""
    if mode == "noised":
        return add_noise(image, rng)
    if mode == "masked":
        return mask_blocks(image, rng)
    return image


class Patch(NamedTuple):
    image: Tensor
    """(3, P, P) normalised photograph patch (also the reconstruction target)."""
    masks: Tensor
    """(C, P, P) 0/1 float."""
    reconstruction_input: Tensor
    """(3, P, P): `image` itself for "clean", else its noised or masked copy."""


@dataclass(frozen=True)
class PatchSampling:
    """What a patch stream needs from the fine-tune settings."""

    patch_size: int
    foreground_fraction: float
    class_probs: np.ndarray
    reconstruction_input: ReconstructionInput


def sample_patch(data: TrainImages, rng: np.random.Generator, sampling: PatchSampling) -> Patch:
    """One augmented training patch: centre, jittered crop, flips/rotations, colour, corruption."""
    centre = choose_centre(data, rng, sampling.foreground_fraction, sampling.class_probs)
    image, masks = data.images[centre.image], data.masks[centre.image]
    size = sampling.patch_size
    jitter = size // 8
    y0 = patch_origin(centre.y + int(rng.integers(-jitter, jitter + 1)), image.shape[0], size)
    x0 = patch_origin(centre.x + int(rng.integers(-jitter, jitter + 1)), image.shape[1], size)
    flip, turns = bool(rng.integers(2)), int(rng.integers(4))
    image_patch = flip_rotate(crop(image, y0, x0, size), flip, turns)
    mask_patch = np.ascontiguousarray(flip_rotate(crop(masks, y0, x0, size), flip, turns))
    tensor = image_to_tensor(random_colour_jitter(image_patch, rng))
    return Patch(
        image=tensor,
        masks=torch.from_numpy(mask_patch).permute(2, 0, 1).float(),
        reconstruction_input=corrupt(tensor, sampling.reconstruction_input, rng),
    )


class PatchStream(IterableDataset[Patch]):
    """An endless stream of training patches, from batch `first_batch` on.

    Each patch is drawn from its own generator keyed by (seed..., batch, position): the
    stream does not depend on the number of workers, and a resumed run continues it exactly
    (drseg.train.streams).
    """

    def __init__(
        self,
        data: TrainImages,
        sampling: PatchSampling,
        seed: Sequence[int],
        first_batch: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.data = data
        self.sampling = sampling
        self.seed = tuple(seed)
        self.first_batch = first_batch
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Patch]:
        for rng in item_generators(self.seed, self.first_batch, self.batch_size):
            yield sample_patch(self.data, rng, self.sampling)
