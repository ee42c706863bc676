"""The evaluate stage: a scorer (the served graph) and a dataset split -> metrics, plots,
report.

Thresholds never see the pixels they are scored on: the split's photographs are dealt
into k folds (photograph i into fold i mod k, in manifest order), and each fold is scored at
the per-class thresholds that maximise the Dice of the other folds together. The reported
and gated Dice and IoU are those cross-fitted numbers. The thresholds shipped in the
serving contract are tuned on the whole split (more pixels, a steadier choice); they are
stored as each class's `threshold` and have no score of their own here: any Dice measured
at them on this split would be optimistic. AUPR does not depend on a threshold.

Two passes over the split. The first runs the scorer once per photograph, adds the
probabilities to the precision-recall histograms of its fold and caches them in a
temporary folder; the thresholds are then fixed; the second pass thresholds the cached
probabilities with the scorer's own thresholding (the client's) for the Dice and the
overlays, so no photograph is inferred twice.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from drseg import atomic
from drseg.config import EvaluateSettings
from drseg.data import dataset
from drseg.data.dataset import RecordEntry
from drseg.evaluate.metrics import (
    IDRID_BEST_AUPR,
    PixelCurves,
    ThresholdedDice,
    combined,
    threshold_bin,
    thresholds_tuple,
)
from drseg.evaluate.plots import draw_overlay, plot_pr_curves
from drseg.evaluate.schema import METRICS_FILE, ClassMetrics, MergedMetrics, Metrics, defined

PR_CURVES_FILE = "pr_curves.png"
REPORT_FILE = "report.md"
OVERLAYS_DIR = "overlays"


class Scorer(Protocol):
    """What evaluation needs of a model: drseg.evaluate.served.ServedGraph."""

    @property
    def classes(self) -> tuple[str, ...]: ...

    def probabilities(
        self, photograph: Path
    ) -> tuple[np.ndarray, np.ndarray]:  # (C, H, W) float32, (H, W) field of view
        ...

    def masks(
        self, probabilities: np.ndarray, fov: np.ndarray, thresholds: dict[str, float]
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class EvaluationResult:
    metrics: Metrics
    metrics_path: Path
    plot_paths: tuple[Path, ...]
    overlay_paths: tuple[Path, ...]
    report_path: Path


def _read_truth(root: Path, record: RecordEntry, classes: tuple[str, ...]) -> np.ndarray:
    """(C, H, W) bool; a class without a mask file is all-negative, as IDRiD scores it."""
    width, height = record.size
    truth = np.zeros((len(classes), height, width), bool)
    for c, cls in enumerate(classes):
        if cls in record.masks:
            truth[c] = dataset.read_mask(dataset.mask_path(root, cls, record.id))
    return truth


def _split_records(
    root: Path, classes: tuple[str, ...], split: str
) -> tuple[dataset.Manifest, list[RecordEntry]]:
    manifest = dataset.load_manifest(root)
    unknown = [c for c in classes if c not in manifest.classes]
    if unknown:
        raise ValueError(
            f"{root}: the dataset has classes {manifest.classes}, not {unknown}; evaluate "
            f"classes the dataset was ingested with"
        )
    records = [r for r in manifest.records if r.split == split]
    if not records:
        splits = sorted({r.split for r in manifest.records})
        raise dataset.DatasetError(
            f"{root}: no records in split {split!r} (the dataset has {splits}); pick one of "
            f"those or re-ingest with a val_fraction above 0"
        )
    return manifest, records


def _tuned(curves: PixelCurves, default: float, where: str) -> tuple[dict[str, float], list[str]]:
    """Per class the Dice-optimal threshold on `curves`; the default, with a note, for a
    class without a lesion pixel there (nothing to tune on)."""
    thresholds, notes = {}, []
    for cls in curves.classes:
        if curves.positives(cls):
            thresholds[cls] = curves.best_threshold(cls)
        else:
            thresholds[cls] = default
            notes.append(f"{cls}: no lesion pixels in {where}; threshold left at {default}.")
    return thresholds, notes


@dataclass(frozen=True)
class _Thresholds:
    shipped: dict[str, float]
    per_fold: list[dict[str, float]]
    notes: list[str]


def _cross_fitted(
    fold_curves: list[PixelCurves], given: dict[str, float] | None, default: float
) -> _Thresholds:
    if given is not None:
        return _Thresholds(given, [given], ["Thresholds were given, not tuned on this split."])
    shipped, notes = _tuned(combined(fold_curves), default, "the split")
    per_fold = []
    for f in range(len(fold_curves)):
        others = combined([c for g, c in enumerate(fold_curves) if g != f])
        tuned, fold_notes = _tuned(others, default, f"the folds other than {f + 1}")
        per_fold.append(tuned)
        notes += fold_notes
    return _Thresholds(shipped, per_fold, notes)


_NOTES = (
    "AUPR: area under one precision-recall curve over all pixels of the split inside the "
    "field of view (IDRiD sub-challenge 1; average-precision definition, probabilities in "
    "bins of 1/{bins}); null when the split has no lesion pixel of the class.",
    "dice, iou: dataset-level, true/false positives and false negatives summed over all "
    "pixels of the split, each photograph thresholded at its fold's thresholds; null "
    "(undefined, and failing any gate rule) when neither the truth nor the prediction has "
    "a lesion pixel.",
    "threshold: what the serving contract ships (tuned on the whole split); fold_thresholds: "
    "what each fold was scored at (tuned on the other folds).",
    "per_image_dice_mean: mean over the images whose ground truth has the class; images with "
    "empty ground truth are excluded (images_excluded_empty; of them images_empty_both had "
    "no prediction either) because any false positive scores them 0; null when no image has "
    "the class.",
    "merged.dice: the any-lesion mask (union over classes of the truth against the union of "
    "the thresholded predictions), dataset-level.",
)


def _metrics(
    manifest: dataset.Manifest,
    split: str,
    images: int,
    curves: PixelCurves,
    scores: ThresholdedDice,
    thresholds: _Thresholds,
    given: bool,
    scored: str,
    model_version: int | None,
) -> Metrics:
    per_class = {}
    for cls in curves.classes:
        dice, iou = scores.dice_iou(cls)
        per_class[cls] = ClassMetrics(
            aupr=defined(curves.aupr(cls)),
            dice=defined(dice),
            iou=defined(iou),
            threshold=threshold_bin(thresholds.shipped[cls], curves.bins) / curves.bins,
            fold_thresholds=() if given else tuple(t[cls] for t in thresholds.per_fold),
            per_image_dice_mean=defined(scores.per_image_mean(cls)),
            images_with_lesion=len(scores.per_image[cls]),
            images_excluded_empty=scores.excluded_empty[cls],
            images_empty_both=scores.empty_both[cls],
            lesion_pixels=curves.positives(cls),
            idrid_best_aupr=IDRID_BEST_AUPR.get(cls),
        )
    auprs = [m.aupr for m in per_class.values() if m.aupr is not None]
    return Metrics(
        split=split,
        images=images,
        dataset_hash=manifest.dataset_hash,
        scored=scored,
        model_version=model_version,
        thresholds="given" if given else "cross_fitted",
        folds=len(thresholds.per_fold),
        classes=per_class,
        mean_aupr=float(np.mean(auprs)) if auprs else None,
        merged=MergedMetrics(dice=defined(scores.merged_dice())),
        notes=tuple(note.format(bins=curves.bins) for note in _NOTES) + tuple(thresholds.notes),
    )


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(metrics: Metrics, overlays: list[str]) -> str:
    columns = (
        ("AUPR", "aupr"),
        ("IDRiD best AUPR", "idrid_best_aupr"),
        ("Dice", "dice"),
        ("IoU", "iou"),
        ("shipped threshold", "threshold"),
        ("per-image Dice", "per_image_dice_mean"),
        ("images with lesion", "images_with_lesion"),
        ("excluded (empty truth)", "images_excluded_empty"),
        ("empty truth and prediction", "images_empty_both"),
    )
    how = (
        f"Dice and IoU cross-fitted over {metrics.folds} folds (each scored at thresholds "
        "tuned on the others); the shipped thresholds are tuned on the whole split."
        if metrics.thresholds == "cross_fitted"
        else "Dice and IoU at the given thresholds."
    )
    version = "" if metrics.model_version is None else f" Model version {metrics.model_version}."
    lines = [
        f"# Lesion segmentation on the `{metrics.split}` split",
        "",
        f"{metrics.images} photographs, dataset `{metrics.dataset_hash[:12]}`; scored: "
        f"{metrics.scored}.{version} {how}",
        "",
        "| class | " + " | ".join(title for title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for cls, values in metrics.classes.items():
        cells = " | ".join(_cell(getattr(values, key)) for _, key in columns)
        lines.append(f"| {cls} | {cells} |")
    lines += [
        "",
        f"**Mean AUPR:** {_cell(metrics.mean_aupr)}  ",
        f"**Merged any-lesion Dice:** {_cell(metrics.merged.dice)}",
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in metrics.notes),
        "",
        "## Precision-recall curves",
        "",
        f"![precision-recall curves]({PR_CURVES_FILE})",
    ]
    if overlays:
        lines += ["", "## Overlays"]
        for name in overlays:
            lines += ["", f"![{Path(name).stem}]({name})"]
    return "\n".join(lines) + "\n"


def _folds(records: list[RecordEntry], folds: int, tuned: bool) -> int:
    if not tuned:
        return 1
    if len(records) < 2:
        raise dataset.DatasetError(
            f"{len(records)} photograph in the split: cross-fitted thresholds need at least 2 "
            f"(each fold is scored at thresholds tuned on the others); re-ingest with a "
            f"larger val_fraction, or give the thresholds"
        )
    return min(folds, len(records))


def _infer_split(
    scorer: Scorer, root: Path, records: list[RecordEntry], folds: int, cache: Path
) -> list[PixelCurves]:
    """First pass: the scorer on each photograph, into its fold's curves; probabilities
    and the scorer's field of view cached as <cache>/<id>.npz for the second pass."""
    curves = [PixelCurves(scorer.classes) for _ in range(folds)]
    for i, record in enumerate(
        tqdm(records, desc="evaluate", unit="img", file=sys.stderr, disable=None)
    ):
        probs, served_fov = scorer.probabilities(dataset.image_path(root, record.id))
        fov = dataset.read_mask(dataset.fov_path(root, record.id))
        curves[i % folds].update(probs, _read_truth(root, record, scorer.classes), fov)
        np.savez(cache / f"{record.id}.npz", probs=probs, fov=served_fov)
    return curves


def _score_thresholded(
    scorer: Scorer,
    root: Path,
    records: list[RecordEntry],
    per_fold: list[dict[str, float]],
    cache: Path,
    overlays: int,
    work: Path,
) -> tuple[ThresholdedDice, list[str]]:
    """Second pass: each photograph thresholded at its fold's thresholds, scored, and the
    first `overlays` drawn; returns the overlays' paths relative to `work`."""
    scores = ThresholdedDice(scorer.classes)
    overlay_names: list[str] = []
    for i, record in enumerate(records):
        cached = np.load(cache / f"{record.id}.npz")
        pred = scorer.masks(cached["probs"], cached["fov"], per_fold[i % len(per_fold)])
        truth = _read_truth(root, record, scorer.classes)
        scores.update(pred, truth, dataset.read_mask(dataset.fov_path(root, record.id)))
        if len(overlay_names) < overlays:
            name = f"{OVERLAYS_DIR}/{record.id}.png"
            rgb = dataset.read_rgb(dataset.image_path(root, record.id))
            draw_overlay(rgb, truth, pred, scorer.classes, work / name)
            overlay_names.append(name)
    return scores, overlay_names


def evaluate_dataset(
    scorer: Scorer,
    dataset_dir: Path,
    out_dir: Path,
    settings: EvaluateSettings,
    scored: str,
    split: str = "val",
    thresholds: dict[str, float] | None = None,
    model_version: int | None = None,
) -> EvaluationResult:
    """Score every photograph of `split` of an ingest-stage dataset and write metrics.json,
    pr_curves.png, overlays/<id>.png and report.md into `out_dir` (a new or empty folder,
    completed atomically). `thresholds` None cross-fits them (see the module docstring);
    `scored` says what the scorer is, `model_version` which registry version (if any)."""
    root, out = Path(dataset_dir), Path(out_dir)
    classes = scorer.classes
    manifest, records = _split_records(root, classes, split)
    given = (
        None
        if thresholds is None
        else dict(zip(classes, thresholds_tuple(classes, thresholds), strict=True))
    )
    folds = _folds(records, settings.folds, given is None)
    with (
        atomic.output_dir(out) as work,
        tempfile.TemporaryDirectory(prefix="drseg-evaluate-") as cache_dir,
    ):
        cache = Path(cache_dir)
        fold_curves = _infer_split(scorer, root, records, folds, cache)
        chosen = _cross_fitted(fold_curves, given, settings.default_threshold)
        scores, overlay_names = _score_thresholded(
            scorer, root, records, chosen.per_fold, cache, settings.overlays, work
        )
        curves = combined(fold_curves)
        metrics = _metrics(
            manifest,
            split,
            len(records),
            curves,
            scores,
            chosen,
            given is not None,
            scored,
            model_version,
        )
        metrics.write(work / METRICS_FILE)
        plot_pr_curves(curves, work / PR_CURVES_FILE)
        atomic.write_text(work / REPORT_FILE, _markdown(metrics, overlay_names))
    return EvaluationResult(
        metrics=metrics,
        metrics_path=out / METRICS_FILE,
        plot_paths=(out / PR_CURVES_FILE,),
        overlay_paths=tuple(out / name for name in overlay_names),
        report_path=out / REPORT_FILE,
    )
