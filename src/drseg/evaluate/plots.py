"""Pictures for people: precision-recall curves and prediction overlays, written as PNG."""

from __future__ import annotations

import io
import math
from pathlib import Path

import cv2
import numpy as np

from drseg import atomic
from drseg.classes import CLASS_COLOURS, OTHER_COLOUR
from drseg.evaluate.metrics import IDRID_BEST_AUPR, PixelCurves
from drseg.legend import with_legend

_FILL_ALPHA = 0.45


def plot_pr_curves(curves: PixelCurves, path: Path) -> None:
    """One PNG, a precision-recall panel per class, AUPR in the title and the IDRiD
    challenge's best AUPR as a dotted reference line (an area, drawn at that precision)."""
    # Imported here: the GPU trainer image has no matplotlib and must still import drseg.
    from matplotlib.figure import Figure

    classes = curves.classes
    columns = min(len(classes), 2)
    rows = math.ceil(len(classes) / columns)
    figure = Figure(figsize=(4.5 * columns, 4 * rows), layout="constrained")
    for index, cls in enumerate(classes):
        axes = figure.add_subplot(rows, columns, index + 1)
        recall, precision, _ = curves.pr_curve(cls)
        colour = tuple(v / 255 for v in CLASS_COLOURS.get(cls, (0, 0, 0)))
        if recall.size:
            axes.step(
                np.concatenate([[0.0], recall]),
                np.concatenate([precision[:1], precision]),
                where="pre",
                color=colour,
                label=f"AUPR {curves.aupr(cls):.3f}",
            )
            axes.set_title(f"{cls}: AUPR {curves.aupr(cls):.3f}")
        else:
            axes.text(0.5, 0.5, "no lesion pixels in this split", ha="center", va="center")
            axes.set_title(f"{cls}: AUPR undefined")
        if cls in IDRID_BEST_AUPR:
            axes.axhline(
                IDRID_BEST_AUPR[cls],
                color="grey",
                linestyle=":",
                label=f"IDRiD best AUPR {IDRID_BEST_AUPR[cls]:.3f}",
            )
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="lower left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic.write_bytes(path, buffer.getvalue())


def draw_overlay(
    image_rgb: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    classes: tuple[str, ...],
    path: Path,
) -> None:
    """The photograph beside a copy with predictions filled in translucent class colours and
    ground truth outlined in the same colours, a legend underneath; one PNG."""
    if truth.shape != pred.shape or truth.shape != (len(classes), *image_rgb.shape[:2]):
        raise ValueError(
            f"truth {truth.shape} and pred {pred.shape} must be (C, H, W) = "
            f"({len(classes)}, {image_rgb.shape[0]}, {image_rgb.shape[1]}) for {path}"
        )
    overlay = image_rgb.astype(np.float32)
    for c, cls in enumerate(classes):
        colour = np.array(CLASS_COLOURS.get(cls, OTHER_COLOUR), np.float32)
        filled = np.asarray(pred[c], bool)
        overlay[filled] = (1 - _FILL_ALPHA) * overlay[filled] + _FILL_ALPHA * colour
    overlay_u8 = np.ascontiguousarray(overlay.round().astype(np.uint8))
    thickness = max(1, image_rgb.shape[1] // 800)
    for c, cls in enumerate(classes):
        contours, _ = cv2.findContours(
            np.asarray(truth[c], np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(overlay_u8, contours, -1, CLASS_COLOURS.get(cls, OTHER_COLOUR), thickness)
    pair = np.concatenate([image_rgb, overlay_u8], axis=1)
    picture = with_legend(pair, classes, "outline: ground truth, fill: prediction")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic.write_bytes(path, encoded.tobytes())
