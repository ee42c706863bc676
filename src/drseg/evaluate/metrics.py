"""Lesion segmentation metrics as the IDRiD challenge (sub-challenge 1) computes them.

The challenge ranks methods per lesion class by the area under ONE precision-recall curve
over all pixels of all photographs of a split (not a mean over photographs); a photograph
without a mask for a class counts as all-negative. Keeping every pixel's probability for a
split would take gigabytes, so probabilities are quantised into `bins` equal bins and only
per-class histograms of positive and negative pixels are kept (2 x C x bins counts). Every
threshold is a bin edge k / bins: a pixel is predicted positive when its probability is at
least k / bins, which is the bin index being at least k. Thresholded masks are the client's
(drseg.serving.client.lesion_masks), so the Dice reported is the Dice of what is served.

Pixels outside the field of view are ignored when a FOV is given. This differs from the
challenge, which scores every pixel, only by dropping easy negatives: the surround is black
and never holds a lesion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

IDRID_BEST_AUPR: dict[str, float] = {"MA": 0.50, "HE": 0.68, "EX": 0.885, "SE": 0.70}
"""Best AUPR reported in the IDRiD challenge per class (Porwal et al., MedIA 2020)."""

EMPTY_DICE = math.nan
"""Dice (and IoU) when neither the truth nor the prediction has a positive pixel: 0 / 0,
undefined. Scoring it 1.0 let a model that predicts nothing pass on data without lesions
(a misnamed mask folder); NaN reaches metrics.json as null, and a gate rule that reads a
null fails."""

Counts = npt.NDArray[np.int64]


def quantize(probs: np.ndarray, bins: int) -> npt.NDArray[np.uint16]:
    """Bin index floor(p * bins), clipped to bins - 1 so that p = 1 lands in the top bin."""
    if not 1 <= bins <= np.iinfo(np.uint16).max:
        raise ValueError(f"bins={bins}: must be between 1 and 65535 (bin indices are uint16)")
    index = np.floor(np.asarray(probs, np.float64) * bins)
    return np.clip(index, 0, bins - 1).astype(np.uint16)


def threshold_bin(threshold: float, bins: int) -> int:
    """The bin edge a threshold snaps to: pixels with bin index >= it are positive."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1]; use a probability")
    return round(threshold * bins)


def dice_iou(tp: int, fp: int, fn: int, empty: float = EMPTY_DICE) -> tuple[float, float]:
    """Dice and IoU from counts; `empty` for both when there is nothing to find or found
    (EMPTY_DICE, undefined, for a score; an agreement of two models may pass 1.0)."""
    if tp + fp + fn == 0:
        return empty, empty
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def _check_shapes(
    classes: tuple[str, ...], probs: np.ndarray, truth: np.ndarray, fov: np.ndarray | None
) -> None:
    expected = (len(classes), *truth.shape[1:])
    if probs.shape != truth.shape or truth.shape != expected:
        raise ValueError(
            f"prediction {probs.shape} and truth {truth.shape} must both be (C, H, W) with "
            f"C = {len(classes)} classes {classes}"
        )
    if fov is not None and fov.shape != truth.shape[1:]:
        raise ValueError(f"fov has shape {fov.shape}; expected (H, W) = {truth.shape[1:]}")


class PixelCurves:
    """Per-class histograms of positive and negative pixel probabilities over a split."""

    def __init__(self, classes: tuple[str, ...], bins: int = 10_000) -> None:
        quantize(np.zeros(0), bins)  # validates bins
        self.classes = classes
        self.bins = bins
        self.positive: Counts = np.zeros((len(classes), bins), np.int64)
        self.negative: Counts = np.zeros((len(classes), bins), np.int64)

    def update(self, probs: np.ndarray, truth: np.ndarray, fov: np.ndarray | None) -> None:
        """Add one image: probs (C, H, W) in [0, 1], truth (C, H, W) bool, fov (H, W) bool
        or None. Pixels outside the FOV are ignored; with None every pixel counts."""
        _check_shapes(self.classes, probs, truth, fov)
        inside = np.ones(truth.shape[1:], bool) if fov is None else np.asarray(fov, bool)
        quantized = quantize(probs, self.bins)
        for c in range(len(self.classes)):
            lesion = np.asarray(truth[c], bool)
            self.positive[c] += np.bincount(quantized[c][lesion & inside], minlength=self.bins)
            self.negative[c] += np.bincount(quantized[c][~lesion & inside], minlength=self.bins)

    def _index(self, cls: str) -> int:
        if cls not in self.classes:
            raise KeyError(f"class {cls!r} was not evaluated; the classes are {self.classes}")
        return self.classes.index(cls)

    def positives(self, cls: str) -> int:
        """Lesion pixels of the class in the split."""
        return int(self.positive[self._index(cls)].sum())

    def _predicted(self, cls: str) -> tuple[Counts, Counts]:
        """True and false positives when thresholding at bin edge k, at index k = 0 .. bins
        (edge bins predicts nothing)."""
        c = self._index(cls)
        tp = np.append(np.cumsum(self.positive[c][::-1])[::-1], 0)
        fp = np.append(np.cumsum(self.negative[c][::-1])[::-1], 0)
        return tp, fp

    def pr_curve(self, cls: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(recall, precision, threshold) at every bin edge that changes the prediction,
        from the highest threshold down; empty arrays when the class has no positives."""
        total = self.positives(cls)
        if total == 0:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        c = self._index(cls)
        tp, fp = self._predicted(cls)
        edges = np.flatnonzero(self.positive[c] + self.negative[c])[::-1]
        recall = tp[edges] / total
        precision = tp[edges] / (tp[edges] + fp[edges])
        return recall, precision, edges / self.bins

    def aupr(self, cls: str) -> float:
        """Average precision, sklearn's step-wise definition: sum over thresholds of
        (recall gained) x (precision there), pixels in one bin counting as tied scores.
        NaN when the class has no positive pixel in the split: the curve is undefined
        (recall divides by zero), and the JSON report shows it as null."""
        recall, precision, _ = self.pr_curve(cls)
        if recall.size == 0:
            return math.nan
        gained = np.diff(recall, prepend=0.0)
        return float(np.sum(gained * precision))

    def best_threshold(self, cls: str) -> float:
        """The bin edge 1/bins .. 1 that maximises dataset-level Dice (edge 0 would predict
        every pixel). Ties, such as the whole gap between perfectly separated scores, go to
        the edge nearest 0.5, the untuned default, not to an end of the gap that the next
        photograph's scores would cross first."""
        tp, fp = (counts[1:] for counts in self._predicted(cls))
        denominator = self.positives(cls) + tp + fp
        dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        edges = (np.flatnonzero(dice == dice.max()) + 1) / self.bins
        return float(edges[np.argmin(np.abs(edges - 0.5))])


def combined(curves: list[PixelCurves]) -> PixelCurves:
    """One set of histograms holding every pixel of `curves` (same classes and bins)."""
    if not curves:
        raise ValueError("no curves to combine; pass at least one")
    total = PixelCurves(curves[0].classes, curves[0].bins)
    for part in curves:
        if (part.classes, part.bins) != (total.classes, total.bins):
            raise ValueError(
                f"curves of classes {part.classes} with {part.bins} bins cannot join "
                f"{total.classes} with {total.bins} bins"
            )
        total.positive += part.positive
        total.negative += part.negative
    return total


class ThresholdedDice:
    """Dataset-level Dice and IoU per class, per-image Dice per class and the Dice of the
    merged any-lesion mask, from predictions already thresholded.

    Dataset-level scores sum TP, FP and FN over all pixels of the split (inside the FOV).
    Per-image Dice skips images whose ground truth is empty for the class inside the FOV:
    there, any false positive gives 0 and none gives an undefined 0 / 0, which would swamp
    the mean with what the dataset-level Dice measures better; skipped images are counted,
    and so are those where the prediction is empty too. The merged mask is the union over
    classes, for the truth and for the prediction, its Dice dataset-level.
    """

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.classes = classes
        self.per_image: dict[str, list[float]] = {c: [] for c in classes}
        self.excluded_empty: dict[str, int] = dict.fromkeys(classes, 0)
        self.empty_both: dict[str, int] = dict.fromkeys(classes, 0)
        self.counts = np.zeros((len(classes), 3), np.int64)  # per class: tp, fp, fn
        self.merged_counts = np.zeros(3, np.int64)

    def update(self, pred: np.ndarray, truth: np.ndarray, fov: np.ndarray | None) -> None:
        """Add one image: pred and truth (C, H, W) bool, fov (H, W) bool or None."""
        _check_shapes(self.classes, pred, truth, fov)
        inside = np.ones(truth.shape[1:], bool) if fov is None else np.asarray(fov, bool)
        pred = np.asarray(pred, bool) & inside
        truth = np.asarray(truth, bool) & inside
        for c, cls in enumerate(self.classes):
            tp = int(np.count_nonzero(pred[c] & truth[c]))
            fp = int(np.count_nonzero(pred[c])) - tp
            fn = int(np.count_nonzero(truth[c])) - tp
            self.counts[c] += (tp, fp, fn)
            if tp + fn == 0:
                self.excluded_empty[cls] += 1
                self.empty_both[cls] += fp == 0
                continue
            self.per_image[cls].append(dice_iou(tp, fp, fn)[0])
        any_pred, any_truth = pred.any(axis=0), truth.any(axis=0)
        tp = int(np.count_nonzero(any_pred & any_truth))
        self.merged_counts += (
            tp,
            int(np.count_nonzero(any_pred)) - tp,
            int(np.count_nonzero(any_truth)) - tp,
        )

    def dice_iou(self, cls: str) -> tuple[float, float]:
        """Dataset-level Dice and IoU of one class; NaN when the split has no lesion pixel
        of it and none was predicted."""
        tp, fp, fn = (int(n) for n in self.counts[self.classes.index(cls)])
        return dice_iou(tp, fp, fn)

    def per_image_mean(self, cls: str) -> float:
        """Mean per-image Dice over images with lesion pixels; NaN when there are none."""
        scores = self.per_image[cls]
        return float(np.mean(scores)) if scores else math.nan

    def merged_dice(self) -> float:
        tp, fp, fn = (int(n) for n in self.merged_counts)
        return dice_iou(tp, fp, fn)[0]


def thresholds_tuple(
    classes: tuple[str, ...], thresholds: Mapping[str, float]
) -> tuple[float, ...]:
    """Thresholds in class order; every class must have one, a probability."""
    missing = [c for c in classes if c not in thresholds]
    if missing:
        raise ValueError(
            f"thresholds {dict(thresholds)} lack classes {missing}; give one for every class "
            f"of {classes}"
        )
    outside = {c: thresholds[c] for c in classes if not 0.0 <= thresholds[c] <= 1.0}
    if outside:
        raise ValueError(f"thresholds {outside} are outside [0, 1]; use probabilities")
    return tuple(float(thresholds[c]) for c in classes)
