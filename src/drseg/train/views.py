"""SimCLR views of fundus photographs: where they are cut (worker) and how they are drawn (device).

A view is a `crop_size` square at the working resolution, never rescaled (lesion sizes in
pixels are what fine-tuning sees, DOMAIN.md), rotated by any angle, perhaps mirrored, with
mild brightness, contrast and saturation jitter and a mild blur. There is no greyscale and no
hue shift: lesion classes differ by colour (red haemorrhages, yellow exudates).

The two views of a photograph are centred near one anchor (at most MAX_SHIFT x crop_size
apart per axis), so they overlap: views from far apart share only photograph-wide traits
(camera, pigmentation, exposure), which the encoder would learn to match instead of the
local structure that lesions are.

The work is split by cost. A DataLoader worker does the cheap, branchy part in numpy: it
draws the placement and every random factor from an explicit Generator, checks the field of
view, and cuts a uint8 window wide enough for any rotation. The per-pixel part (rotation,
colour, blur, normalisation) is `render_views`, batched torch on the batch once it is on the
device: nearly free on a GPU, while per view in a worker it measured ~10 ms at 256 px on one
CPU core, which would starve a GPU. Workers run no OpenCV (see parallel.py on why).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)
from torch import Tensor
from torch.utils.data import IterableDataset

from drseg.data import dataset
from drseg.models.normalize import IMAGE_MEAN, IMAGE_STD
from drseg.train.streams import item_generators

CROP_MULTIPLE = 32
"""crop_size must be a multiple of this: the encoder's stride (and of CHECK_STRIDE)."""
MAX_SHIFT = 0.25
"""Each view's centre lies within +- MAX_SHIFT x crop_size (per axis) of the pair's anchor."""
BRIGHTNESS = 0.2
CONTRAST = 0.2
SATURATION = 0.2
"""Colour jitter: factors drawn uniformly in 1 +- these."""
BLUR_PROBABILITY = 0.5
BLUR_SIGMA = (0.1, 1.0)
"""Share of views blurred, and the range of the blur's sigma in pixels. Kept below ~1 px:
half of all microaneurysms are about 4 px across at 1024 px wide (DOMAIN.md)."""
CHECK_STRIDE = 4
CHECK_RADIUS = 3
"""The field-of-view check looks at one pixel per CHECK_STRIDE x CHECK_STRIDE cell of the
view, in an FOV map eroded by CHECK_RADIUS (a square neighbourhood): the cell's view pixels
lie within 1.5 * sqrt(2) px of its centre, their bilinear sources within 1 px more, and the
rounded centre within 0.5 px, so every source pixel is within floor(3.62) = 3 px of it. An
interior centre thus vouches for its whole cell, and the checked share is a lower bound of the
true one at 1/16 of the cost."""
PLACEMENT_TRIES = 32
"""Anchors tried before both views fall back to the FOV centre."""
_ANCHOR_TRIES = 64


class Photograph(NamedTuple):
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    interior: np.ndarray
    """(H, W) bool: FOV pixels whose CHECK_RADIUS square neighbourhood is all FOV."""
    fov_centre: tuple[int, int]
    """(y, x) centroid of the FOV (the photograph's centre if it has none)."""


class Placement(NamedTuple):
    """Where a view comes from: view pixel (i, j) of a size-S view shows the photograph point

        (x, y) = (x - 1/2, y - 1/2) + R(angle) @ F @ (j - (S - 1)/2, i - (S - 1)/2)

    with R(a) = [[cos a, -sin a], [sin a, cos a]] and F = diag(-1, 1) if `flip` (mirrored
    columns) else the identity; the view's centre is the corner its four middle pixels share.
    """

    y: int
    x: int
    angle: float
    """Radians."""
    flip: bool


class ViewParams(NamedTuple):
    """Per-view random factors, float32 tensors of one shape (one value per view)."""

    angle: Tensor
    flip: Tensor
    """1.0 mirrors the view, 0.0 does not."""
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    blur_sigma: Tensor
    """Pixels; 0 leaves the view unblurred."""


class ViewPair(NamedTuple):
    """What a worker yields per photograph; a batch of B stacks both fields on a first axis."""

    windows: Tensor
    """(2, W, W, 3) uint8 windows centred on the two placements (W = window_side)."""
    params: ViewParams
    """Each (2,)."""


def fov_interior(fov: np.ndarray, radius: int = CHECK_RADIUS) -> np.ndarray:
    """(H, W) bool -> pixels whose (2 radius + 1)-pixel square lies wholly in the FOV.

    A box sum over a summed-area table: numpy only, so no OpenCV near the workers.
    """
    side = 2 * radius + 1
    padded = np.pad(fov.astype(np.int32), ((radius + 1, radius), (radius + 1, radius)))
    table = padded.cumsum(axis=0, dtype=np.int32).cumsum(axis=1, dtype=np.int32)
    box = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    return np.asarray(box == side * side)


def photograph(image: np.ndarray, fov: np.ndarray) -> Photograph:
    """A photograph and its FOV mask, with what view placement needs precomputed."""
    if fov.shape != image.shape[:2]:
        raise ValueError(
            f"FOV mask of shape {fov.shape} for a photograph of shape {image.shape[:2]}; "
            "the dataset is inconsistent, re-run ingest"
        )
    ys, xs = np.nonzero(fov)
    centre = (
        (int(ys.mean()), int(xs.mean())) if len(ys) else (image.shape[0] // 2, image.shape[1] // 2)
    )
    return Photograph(image, fov_interior(fov), centre)


def load_photographs(root: Path, split: dataset.Split | None = None) -> list[Photograph]:
    """Every photograph of the dataset folder `root` (only those of `split`, if given)."""
    root = Path(root)
    manifest = dataset.load_manifest(root)
    return [
        photograph(
            dataset.read_rgb(dataset.image_path(root, record.id)),
            dataset.read_mask(dataset.fov_path(root, record.id)),
        )
        for record in manifest.records
        if split is None or record.split == split
    ]


def check_crop_size(crop_size: int) -> None:
    if crop_size % CROP_MULTIPLE:
        raise ValueError(
            f"pretrain.crop_size = {crop_size} is not a multiple of {CROP_MULTIPLE}; "
            f"set it to one, e.g. {max(CROP_MULTIPLE, crop_size // CROP_MULTIPLE * CROP_MULTIPLE)}"
        )


def window_side(crop_size: int) -> int:
    """Even side of a window that holds a crop_size view at any angle plus bilinear margin."""
    return 2 * math.ceil((math.sqrt(2) * (crop_size - 1) + 3) / 2)


def _matrix(angle: float, flip: bool) -> np.ndarray:
    """R(angle) @ F of Placement, acting on (x, y)."""
    cos, sin, mirror = math.cos(angle), math.sin(angle), -1.0 if flip else 1.0
    return np.array([[cos * mirror, -sin], [sin * mirror, cos]])


def inside_fraction(interior: np.ndarray, placement: Placement, size: int) -> float:
    """Lower bound of the share of the view's pixels drawn only from FOV pixels."""
    offsets = np.arange(CHECK_STRIDE / 2 - size / 2, size / 2, CHECK_STRIDE)
    u, v = np.meshgrid(offsets, offsets)  # u along the view's columns, v along its rows
    m = _matrix(placement.angle, placement.flip)
    xs = np.rint(placement.x - 0.5 + m[0, 0] * u + m[0, 1] * v).astype(np.intp)
    ys = np.rint(placement.y - 0.5 + m[1, 0] * u + m[1, 1] * v).astype(np.intp)
    height, width = interior.shape
    ok = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    return np.count_nonzero(interior[ys[ok], xs[ok]]) / ys.size


def _anchor(photo: Photograph, rng: np.random.Generator) -> tuple[int, int]:
    """A uniform interior pixel, by rejection: the FOV covers most of a photograph."""
    height, width = photo.interior.shape
    for _ in range(_ANCHOR_TRIES):
        y, x = int(rng.integers(height)), int(rng.integers(width))
        if photo.interior[y, x]:
            return y, x
    return photo.fov_centre


def place_pair(
    photo: Photograph, rng: np.random.Generator, size: int, min_fov_fraction: float
) -> tuple[Placement, Placement]:
    """Two overlapping placements, each with >= min_fov_fraction of the view inside the FOV.

    Tries PLACEMENT_TRIES anchors; then both views are centred on the FOV centre, which is
    the best there is when the crop is large for the FOV.
    """
    shift = int(MAX_SHIFT * size)
    for _ in range(PLACEMENT_TRIES):
        y, x = _anchor(photo, rng)
        dy, dx = rng.integers(-shift, shift + 1, size=(2, 2))
        angles, flips = rng.uniform(0, 2 * math.pi, size=2), rng.integers(2, size=2)
        first, second = (
            Placement(y + int(dy[v]), x + int(dx[v]), float(angles[v]), bool(flips[v]))
            for v in range(2)
        )
        if (
            inside_fraction(photo.interior, first, size) >= min_fov_fraction
            and inside_fraction(photo.interior, second, size) >= min_fov_fraction
        ):
            return first, second
    y, x = photo.fov_centre
    return Placement(y, x, first.angle, first.flip), Placement(y, x, second.angle, second.flip)


def cut_window(image: np.ndarray, y: int, x: int, side: int) -> np.ndarray:
    """Rows y - side/2 .. y + side/2 - 1 (columns alike) of (H, W, C), zero beyond the edges."""
    y0, x0 = y - side // 2, x - side // 2
    window = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + side, image.shape[0]), min(x0 + side, image.shape[1])
    if top < bottom and left < right:
        window[top - y0 : bottom - y0, left - x0 : right - x0] = image[top:bottom, left:right]
    return window


def random_params(rng: np.random.Generator, placements: Sequence[Placement]) -> ViewParams:
    """The placements' geometry plus colour and blur factors drawn from `rng`."""
    n = len(placements)

    def tensor(values: Sequence[float] | np.ndarray) -> Tensor:
        return torch.tensor(np.asarray(values, dtype=np.float32))

    blurred = rng.random(n) < BLUR_PROBABILITY
    return ViewParams(
        angle=tensor([p.angle for p in placements]),
        flip=tensor([float(p.flip) for p in placements]),
        brightness=tensor(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, n)),
        contrast=tensor(rng.uniform(1 - CONTRAST, 1 + CONTRAST, n)),
        saturation=tensor(rng.uniform(1 - SATURATION, 1 + SATURATION, n)),
        blur_sigma=tensor(np.where(blurred, rng.uniform(*BLUR_SIGMA, n), 0.0)),
    )


def sample_view_pair(
    photo: Photograph, rng: np.random.Generator, size: int, min_fov_fraction: float
) -> ViewPair:
    """The worker's share of a positive pair: two windows and their random factors."""
    pair = place_pair(photo, rng, size, min_fov_fraction)
    side = window_side(size)
    windows = np.stack([cut_window(photo.image, p.y, p.x, side) for p in pair])
    return ViewPair(torch.from_numpy(windows), random_params(rng, pair))


def rotate(images: Tensor, angle: Tensor, flip: Tensor, size: int) -> Tensor:
    """(N, C, W, W) windows -> (N, C, size, size) views, bilinear, as Placement describes."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    mirror = 1.0 - 2.0 * flip
    zero = torch.zeros_like(angle)
    # affine_grid maps output to input coordinates in units of half the output (size) and
    # input (W) side; the window's centre is the view's, so there is no translation.
    theta = torch.stack(
        [torch.stack([cos * mirror, -sin, zero], -1), torch.stack([sin * mirror, cos, zero], -1)],
        dim=1,
    ) * (size / images.shape[-1])
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def jitter_colour(
    images: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor
) -> Tensor:
    """(N, 3, H, W) RGB in 0..1 with per-view factors applied; hue is kept, black stays black.

    As patches.jitter_colour: contrast stretches luminance around its mean over the lit pixels,
    applied with brightness as one gain on all three channels (channel ratios kept).
    Saturation then scales each pixel's distance from its grey, which keeps its hue.
    """
    brightness, contrast, saturation = (
        f.view(-1, 1, 1, 1) for f in (brightness, contrast, saturation)
    )
    luminance = images.mean(dim=1, keepdim=True)
    lit = luminance > 0
    lit_pixels = lit.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1)
    mean = luminance.sum(dim=(1, 2, 3), keepdim=True) / lit_pixels  # black adds nothing
    stretched = (mean + contrast * (luminance - mean)).clamp(min=0)
    images = images * torch.where(lit, stretched / luminance.clamp(min=1e-12), 1.0) * brightness
    grey = images.mean(dim=1, keepdim=True)
    return (grey + saturation * (images - grey)).clamp(0, 1)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """(N, C, H, W) blurred with a per-view sigma (pixels; 0 leaves a view as it is).

    Separable, as one grouped convolution per axis over all views, reflecting at the edges.
    """
    radius = math.ceil(3 * BLUR_SIGMA[1])
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-3).view(-1, 1)) ** 2)  # 1e-3: a delta
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    n, c, height, width = images.shape
    weights = kernel.repeat_interleave(c, dim=0)
    flat = images.reshape(1, n * c, height, width)
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="reflect"), weights[:, None, :, None], groups=n * c
    )
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weights[:, None, None, :], groups=n * c
    )
    return flat.view(n, c, height, width)


def render_views(windows: Tensor, params: ViewParams, size: int) -> Tensor:
    """(N, W, W, 3) uint8 windows -> (N, 3, size, size) normalised views, on their device.

    Normalised as models.normalize.image_to_tensor does (tests hold the two equal), batched.
    """
    images = windows.permute(0, 3, 1, 2).float().div_(255.0)
    images = rotate(images, params.angle, params.flip, size)
    images = jitter_colour(images, params.brightness, params.contrast, params.saturation)
    images = gaussian_blur(images, params.blur_sigma)
    mean = images.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def render_pairs(batch: ViewPair, size: int) -> Tensor:
    """A collated batch of B pairs -> (2B, 3, size, size): all first views, then all second."""
    windows = batch.windows.transpose(0, 1).flatten(0, 1)
    params = ViewParams(*(p.transpose(0, 1).flatten() for p in batch.params))
    return render_views(windows, params, size)


class ViewPairStream(IterableDataset[ViewPair]):
    """An endless stream of positive pairs from photographs drawn uniformly.

    Each pair is drawn from its own generator keyed by (seed..., batch, position), as in
    PatchStream, so a resumed run continues the stream exactly.
    """

    def __init__(
        self,
        photographs: Sequence[Photograph],
        crop_size: int,
        min_fov_fraction: float,
        seed: Sequence[int],
        first_batch: int,
        batch_size: int,
    ) -> None:
        super().__init__()
        check_crop_size(crop_size)
        self.photographs = tuple(photographs)
        self.crop_size = crop_size
        self.min_fov_fraction = min_fov_fraction
        self.seed = tuple(seed)
        self.first_batch = first_batch
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[ViewPair]:
        for rng in item_generators(self.seed, self.first_batch, self.batch_size):
            photo = self.photographs[int(rng.integers(len(self.photographs)))]
            yield sample_view_pair(photo, rng, self.crop_size, self.min_fov_fraction)
