"""Field of view, resizing and CLAHE as plain array functions.

Images are H x W x 3 uint8 RGB; masks are H x W bool. Nothing here touches files.
"""

from __future__ import annotations

import cv2
import numpy as np

FOV_THRESHOLD = 20
"""Max-channel value above which a pixel is inside the field of view. The border of a
fundus photograph is black (values < 10 in IDRiD, JPEG noise included); the darkest rim of
the field of view stays well above 20."""


def working_size(width: int, height: int, working_width: int) -> tuple[int, int]:
    """(width, height) at the working width, aspect ratio kept."""
    return working_width, max(1, round(height * working_width / width))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Shrink by area averaging without aliasing small lesions, quickly.

    OpenCV's area resize is fast for whole factors and slow otherwise, so a large shrink
    goes in two steps: area averaging by the largest whole factor, then the small rest
    (under 1.5x) bilinearly, which cannot alias at such a factor. Enlarging is bilinear.
    """
    height, width = image.shape[:2]
    if (width, height) == size:
        return image
    factor = min(width // size[0], height // size[1])
    if factor >= 2:
        image = cv2.resize(image, (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    rest = image.shape[1] / size[0]
    interpolation = cv2.INTER_AREA if rest > 1.5 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A working-resolution pixel is lesion when at least half of its footprint is.

    Area averaging then a 0.5 threshold keeps lesion area unbiased. Nearest-neighbour would
    sample one source pixel per output pixel and keep or drop a 2-pixel microaneurysm by
    where the sampling grid happens to fall. Coverage is averaged in uint8 (0..255).
    """
    if (mask.shape[1], mask.shape[0]) == size:
        return mask.astype(bool, copy=False)
    coverage = np.multiply(mask.astype(bool, copy=False).view(np.uint8), 255, dtype=np.uint8)
    return np.asarray(resize_image(coverage, size) >= 128)


FOV_WORK_WIDTH = 512
"""The field of view is a smooth disc: finding it at 512 px wide and scaling the result up
is ~4-16x cheaper than at the working width and moves its edge by under a pixel or two."""


def fov_mask(image: np.ndarray) -> np.ndarray:
    """The field of view: the largest bright connected region, holes filled."""
    height, width = image.shape[:2]
    small = image
    if width > FOV_WORK_WIDTH:
        small = resize_image(image, working_size(width, height, FOV_WORK_WIDTH))
    bright = (small.max(axis=2) > FOV_THRESHOLD).astype(np.uint8)
    bright = cv2.morphologyEx(bright, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if count <= 1:
        return np.zeros((height, width), dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(region)
    cv2.drawContours(filled, contours, -1, (255,), thickness=cv2.FILLED)
    if filled.shape != (height, width):
        filled = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(filled >= 128)


def clahe(image: np.ndarray, fov: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """CLAHE on the L channel of LAB, inside the field of view only.

    Outside pixels are set to the mean inside lightness before equalising, so the black
    border does not fill the histograms of rim tiles (which would over-brighten the rim),
    and are black again afterwards.
    """
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lightness = lab[:, :, 0]
    if fov.any():
        lightness[~fov] = int(lightness[fov].mean())
    equaliser = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    lab[:, :, 0] = equaliser.apply(lightness)
    out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    out[~fov] = 0
    return out
