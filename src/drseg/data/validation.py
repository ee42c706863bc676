"""Decoding source files with every check a record must pass.

Each check raises `Rejected` with a `Problem` that names the file, what is wrong and how
to fix it; the ingest stage turns those into the quarantine report.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff")

# We check pixel counts ourselves, from the header, with a message that says what to do.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class Problem:
    """One quarantined record or file."""

    id: str
    path: str
    problem: str
    fix: str


class Rejected(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.path}: {problem.problem}")
        self.problem = problem


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    mode: str
    format: str


@dataclass
class DecodedImage:
    rgb: np.ndarray
    notes: list[str] = field(default_factory=list)
    """Conversions applied (greyscale, 16-bit, alpha), reported in the manifest."""


def read_header(data: bytes, record_id: str, path: str, max_pixels: int) -> Header:
    """Size and mode from the header alone, so huge files are refused before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            header = Header(im.width, im.height, im.mode, im.format or "?")
    except Exception as exc:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"unreadable image ({type(exc).__name__}: {exc})",
                "re-export the file as JPEG, PNG or TIFF",
            )
        ) from exc
    if header.width * header.height > max_pixels:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"image is {header.width}x{header.height} "
                f"({header.width * header.height / 1e6:.0f} MP), over the limit of "
                f"{max_pixels / 1e6:.0f} MP; refused before decoding",
                "downscale it, or raise ingest.max_pixels if it is genuine",
            )
        )
    return header


def _to_uint8(array: np.ndarray, notes: list[str]) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        notes.append("16-bit converted to 8-bit")
        return (array.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    notes.append(f"{array.dtype} rescaled to 8-bit")
    lo, hi = float(array.min()), float(array.max())
    scaled = (array.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.asarray(scaled.round().astype(np.uint8))


def _decode_jpeg(data: bytes, header: Header, min_width: int) -> tuple[np.ndarray, list[str]]:
    """PIL, because it raises on truncated files (OpenCV warns and returns grey rows), and
    because draft mode decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, several times
    faster than a full decode, while staying at least `min_width` wide."""
    notes: list[str] = []
    with Image.open(io.BytesIO(data)) as im:
        scale = header.width / max(min_width, 1)
        if scale >= 2:
            im.draft("RGB", (header.width // int(scale), header.height // int(scale)))
        im.load()
        if im.mode == "L":
            notes.append("greyscale converted to RGB")
        elif im.mode != "RGB":
            notes.append(f"{im.mode} converted to RGB")
        rgb = np.asarray(im.convert("RGB"))
    return rgb, notes


def _decode_other(data: bytes) -> tuple[np.ndarray, list[str]]:
    """OpenCV keeps bit depth and channel count exactly (PIL folds 16-bit RGB silently)."""
    notes: list[str] = []
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("the decoder could not read the pixel data (truncated or corrupt)")
    array = _to_uint8(array, notes)
    if array.ndim == 2:
        notes.append("greyscale converted to RGB")
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB), notes
    if array.shape[2] == 4:
        notes.append("alpha channel dropped")
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB), notes
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB), notes


def decode_image(
    data: bytes, header: Header, record_id: str, path: str, min_width: int
) -> DecodedImage:
    """Decode to RGB uint8, at least `min_width` wide where the format allows a cheaper
    reduced decode (JPEG)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if header.format == "JPEG":
                rgb, notes = _decode_jpeg(data, header, min_width)
            else:
                rgb, notes = _decode_other(data)
    except Exception as exc:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"unreadable or truncated image ({exc})",
                "copy the file again from its source; check it opens in an image viewer",
            )
        ) from exc
    return DecodedImage(np.ascontiguousarray(rgb), notes)


def _values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values; by counting for 8- and 16-bit masks (sorting 12 MP is slow)."""
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    if array.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(array.ravel()))
    return np.unique(array)


def _binary(array: np.ndarray, record_id: str, path: str, what: str) -> np.ndarray:
    """True where `array` holds its foreground value: one background value 0 and at most one
    foreground value, or for alpha any two values (the more opaque one is the shape)."""
    values = _values(array)
    if what == "alpha" and len(values) == 2:
        return np.asarray(array == values[1])
    if len(values) <= 2 and values[0] >= 0 and (len(values) == 1 or values[0] == 0):
        return np.asarray(array > 0)
    label = "alpha " if what == "alpha" else ""
    shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
    raise Rejected(
        Problem(
            record_id,
            path,
            f"mask is not binary: {len(values)} distinct {label}values ({shown})",
            "save it with 0 for background and one value (1 or 255) for lesion, "
            "without anti-aliasing or JPEG compression",
        )
    )


def decode_mask(
    data: bytes, record_id: str, path: str, image_size: tuple[int, int], max_pixels: int
) -> np.ndarray:
    """A binary mask as bool: one background value 0 and at most one foreground value.

    Palette masks (IDRiD) are read as palette indices, RGB masks as their brightest channel.
    Where a mask has an alpha channel that carries a shape, the shape is the alpha's when
    the colour is uniform (an opaque lesion on a transparent background of any colour),
    and the mask is refused when colour and alpha draw different shapes: which one is the
    label cannot be known. Size must equal the image's, checked from the header first.
    """
    header = read_header(data, record_id, path, max_pixels)
    if (header.width, header.height) != image_size:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"mask is {header.width}x{header.height} but its image is "
                f"{image_size[0]}x{image_size[1]}",
                "export the mask at the image's size (or pair it with the right image)",
            )
        )
    alpha: np.ndarray | None = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA"):
                alpha = np.asarray(im.getchannel("A"))
                array = np.asarray(im.convert("RGB" if im.mode == "RGBA" else "L"))
            else:
                array = np.asarray(im)
    except Exception as exc:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"unreadable or truncated mask ({exc})",
                "copy the file again from its source",
            )
        ) from exc
    if array.ndim == 3:
        array = array.max(axis=2)
    colour = _binary(array, record_id, path, "colour")
    if alpha is None or alpha.min() == alpha.max():
        return colour
    shape = _binary(alpha, record_id, path, "alpha")
    if colour.all() or not colour.any():
        return shape
    disagree = int(np.count_nonzero(colour != shape))
    if disagree:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"colour and alpha of the mask draw different shapes ({disagree} pixels "
                "differ): which one is the label cannot be known",
                "save the mask without alpha, 0 for background and 255 for lesion",
            )
        )
    return colour


@dataclass(frozen=True)
class MaskLimits:
    """What a plausible mask of one class can be, at 1024 px wide (DOMAIN.md).

    Each limit is several times the largest value measured on the 54 IDRiD training masks
    (in brackets), so every real mask passes, while an inverted or all-foreground mask
    (lesion share over 100 % of the field of view) and scattered noise do not.
    """

    share: float
    """Largest share of the field of view covered by the class."""
    component: int
    """Largest connected component, in pixels at 1024 px wide."""
    components: int
    """Most connected components in one photograph."""


MASK_LIMITS: dict[str, MaskLimits] = {
    "MA": MaskLimits(share=0.03, component=1_500, components=1_500),  # 0.43 %, 119, 125
    "HE": MaskLimits(share=0.5, component=250_000, components=1_000),  # 21.5 %, 71,975, 105
    "EX": MaskLimits(share=0.4, component=150_000, components=4_000),  # 9.5 %, 22,354, 433
    "SE": MaskLimits(share=0.15, component=30_000, components=150),  # 1.9 %, 3,135, 10
    "OD": MaskLimits(share=0.2, component=100_000, components=20),  # 3.8 %, 19,253, 1
}
OTHER_CLASS_LIMITS = MaskLimits(share=0.5, component=10**9, components=10**9)
"""For a configured class DOMAIN.md does not describe: only an inverted or full mask fails."""

OUTSIDE_FOV_SHARE = 0.05
"""Largest share of a mask's lesion pixels outside the field of view: lesions lie in the
retina (the IDRiD masks have at most 0.16 % outside, on the rim)."""


def check_mask(mask: np.ndarray, fov: np.ndarray, cls: str, record_id: str, path: str) -> None:
    """Refuse a mask (at the working size) that cannot be a true mask of its class."""
    lesion = int(np.count_nonzero(mask))
    if not lesion:
        return
    limits = MASK_LIMITS.get(cls, OTHER_CLASS_LIMITS)
    fix = (
        "check the mask: lesion must be the non-zero value (not inverted), it must belong "
        "to this photograph and class"
    )
    fov_pixels = max(int(np.count_nonzero(fov)), 1)
    share = lesion / fov_pixels
    if share > limits.share:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"{cls} mask covers {share:.0%} of the field of view, over the plausible "
                f"{limits.share:.0%} (inverted or all-foreground?)",
                fix,
            )
        )
    margin = max(2, round(fov.shape[1] * 0.01))
    grown = cv2.dilate(fov.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8))
    outside = int(np.count_nonzero(mask & (grown == 0)))
    if outside > OUTSIDE_FOV_SHARE * lesion:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"{outside / lesion:.0%} of the {cls} mask lies outside the field of view",
                fix,
            )
        )
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    scale = (1024 / mask.shape[1]) ** 2
    largest = int(stats[1:, cv2.CC_STAT_AREA].max() * scale)
    if largest > limits.component:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"a {cls} region of {largest} px (at 1024 px wide) is larger than a "
                f"{cls} lesion can be ({limits.component} px)",
                fix,
            )
        )
    if count - 1 > limits.components:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"{count - 1} separate {cls} regions, more than plausible "
                f"({limits.components}): noise or a scrambled mask?",
                fix,
            )
        )


MIN_SOURCE_WIDTH = 256
"""Half of all microaneurysms are about 4 px across at 1024 px wide: in a photograph under
256 px wide they are under a pixel, so it cannot hold the lesions it would be labelled with."""

_FOV_DIAMETER = (0.4, 1.4)
"""Plausible diameter of the field-of-view circle, as a share of the width (IDRiD: 0.80-0.89;
over 1 where the circle is cropped at the sides)."""
_FOV_ROUNDNESS = 0.9
"""Least overlap (IoU) between the field of view and its fitted circle (IDRiD: 0.996)."""


def check_fundus(fov: np.ndarray, source_size: tuple[int, int], record_id: str, path: str) -> None:
    """Refuse a photograph that cannot be a colour fundus photograph: too small to hold
    lesions, or without a round (possibly cropped) field of view of plausible size on a
    dark border."""
    fix = "check that this is a colour fundus photograph at its original resolution"
    if source_size[0] < MIN_SOURCE_WIDTH:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"photograph is {source_size[0]}x{source_size[1]}: under "
                f"{MIN_SOURCE_WIDTH} px wide, a microaneurysm is under a pixel (a thumbnail?)",
                "use the full-resolution photograph",
            )
        )
    height, width = fov.shape
    if fov.mean() < 0.05:
        raise Rejected(
            Problem(
                record_id,
                path,
                "no field of view found (the photograph is almost all black)",
                "check that this is a colour fundus photograph and that it is not blank",
            )
        )
    contours, _ = cv2.findContours(fov.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    edge = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)
    x, y = edge[:, 0], edge[:, 1]
    inner = (x > 1) & (x < width - 2) & (y > 1) & (y < height - 2)
    if inner.sum() < 16:
        raise Rejected(
            Problem(
                record_id,
                path,
                "no dark border around the field of view: the bright area fills the frame "
                "(not a fundus photograph, e.g. a uniform card or a scene)",
                fix,
            )
        )
    x, y = x[inner], y[inner]
    design = np.column_stack([2 * x, 2 * y, np.ones_like(x)])
    (cx, cy, k), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
    radius = float(np.sqrt(max(k + cx * cx + cy * cy, 0.0)))
    rows = np.flatnonzero(fov.any(axis=1))
    yy, xx = np.ogrid[:height, :width]
    circle = ((xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2) & ((yy >= rows[0]) & (yy <= rows[-1]))
    overlap = np.count_nonzero(circle & fov) / max(np.count_nonzero(circle | fov), 1)
    diameter = 2 * radius / width
    if overlap < _FOV_ROUNDNESS or not _FOV_DIAMETER[0] <= diameter <= _FOV_DIAMETER[1]:
        raise Rejected(
            Problem(
                record_id,
                path,
                f"the field of view is not a plausible fundus disc (overlap with a circle "
                f"{overlap:.2f}, least {_FOV_ROUNDNESS}; diameter {diameter:.2f} x width, "
                f"plausible {_FOV_DIAMETER[0]}-{_FOV_DIAMETER[1]})",
                fix,
            )
        )


MASK_REJECTED = "photograph quarantined with its rejected mask"


def photograph_with_mask(record_id: str, path: str, fix: str) -> Problem:
    """The line that takes a photograph out with its mask: a photograph whose mask for a
    class was rejected would otherwise train as lesion-free for that class."""
    return Problem(record_id, path, MASK_REJECTED, fix)
