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


def decode_mask(
    data: bytes, record_id: str, path: str, image_size: tuple[int, int], max_pixels: int
) -> np.ndarray:
    """A binary mask as bool: one background value 0 and at most one foreground value.

    Palette masks (IDRiD) are read as palette indices, RGB(A) masks as their brightest
    channel (alpha ignored). Size must equal the image's, checked from the header first.
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
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA"):
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
    if array.dtype == np.bool_:
        return np.asarray(array)
    if array.dtype in (np.uint8, np.uint16):
        high = int(array.max())
        inside = cv2.inRange(array, np.array([1]), np.array([high - 1])) if high > 1 else None
        between = 0 if inside is None else cv2.countNonZero(inside)
    else:
        between = int(np.count_nonzero((array != 0) & (array != array.max())))
    if between or array.min() < 0:
        values = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise Rejected(
            Problem(
                record_id,
                path,
                f"mask is not binary: {len(values)} distinct values ({shown})",
                "save it with 0 for background and one value (1 or 255) for lesion, "
                "without anti-aliasing or JPEG compression",
            )
        )
    return np.asarray(array > 0)
