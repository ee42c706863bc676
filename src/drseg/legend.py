"""The class-colour legend under every overlay picture (evaluation reports, `drseg predict`).

An overlay without it is a puzzle: the colours are ours (drseg.classes), not a convention a
reader knows, and exudates are drawn cyan because they are yellow themselves.
"""

from __future__ import annotations

import cv2
import numpy as np

from drseg.classes import CLASS_COLOURS, LESION_TABLE, OTHER_COLOUR

LEGEND_HEIGHT = 28
"""Pixels the legend strip adds under a picture."""
SWATCH = 14
"""Side of each class's colour square, pixels."""
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_SCALE = 0.42
_TOP = 7


def _label(cls: str) -> str:
    names = {row.code: row.name for row in LESION_TABLE}
    return f"{cls} {names[cls]}" if cls in names else cls


def legend_strip(width: int, classes: tuple[str, ...], note: str = "") -> np.ndarray:
    """A white RGB strip, LEGEND_HEIGHT x `width`: per class a square of its overlay colour
    and its code and name ("EX hard exudates"), then `note` (how to read the picture)."""
    strip = np.full((LEGEND_HEIGHT, width, 3), 255, np.uint8)
    x = 6
    for cls in classes:
        colour = CLASS_COLOURS.get(cls, OTHER_COLOUR)
        cv2.rectangle(strip, (x - 1, _TOP - 1), (x + SWATCH, _TOP + SWATCH), (0, 0, 0), 1)
        strip[_TOP : _TOP + SWATCH, x : x + SWATCH] = colour
        x += SWATCH + 5
        x = _text(strip, _label(cls), x) + 14
    if note:
        _text(strip, note, x + 10)
    return strip


def _text(strip: np.ndarray, text: str, x: int) -> int:
    """Draw `text` from `x` on the strip's baseline; returns where it ends."""
    cv2.putText(strip, text, (x, _TOP + 12), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    (text_width, _), _ = cv2.getTextSize(text, _FONT, _SCALE, 1)
    return x + text_width


def with_legend(picture: np.ndarray, classes: tuple[str, ...], note: str = "") -> np.ndarray:
    """`picture` (H, W, 3 RGB) with the legend strip appended underneath."""
    return np.concatenate([picture, legend_strip(picture.shape[1], classes, note)], axis=0)
