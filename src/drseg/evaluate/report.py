"""The evaluate stage: a model's logits function and a dataset split -> metrics, plots, report.

Two passes over the split. The first runs tiled inference once per photograph, adds it to
the precision-recall histograms and caches the quantised probabilities in a temporary
folder; thresholds are then fixed (given, or tuned on this split for maximal dataset-level
Dice, which is how the validation split is used: the tuned thresholds are stored with the
model); the second pass thresholds the cached probabilities for per-image and merged Dice
and the overlays, so no photograph is inferred twice.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from drseg import atomic
from drseg.config import EvaluateSettings
from drseg.data import dataset
from drseg.data.dataset import RecordEntry
from drseg.evaluate.metrics import (
    IDRID_BEST_AUPR,
    PixelCurves,
    ThresholdedDice,
    binarize,
    quantize,
    threshold_bin,
    thresholds_tuple,
)
from drseg.evaluate.plots import draw_overlay, plot_pr_curves
from drseg.evaluate.tiling import LogitsFn, predict_probabilities
from drseg.models.normalize import image_to_tensor

METRICS_FILE = "metrics.json"
PR_CURVES_FILE = "pr_curves.png"
REPORT_FILE = "report.md"
OVERLAYS_DIR = "overlays"


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, Any]
    """The content of metrics.json (NaN already replaced by None)."""
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


def _tuned_thresholds(curves: PixelCurves, default: float) -> tuple[tuple[float, ...], list[str]]:
    """Per class the Dice-optimal threshold; the default, with a note, for a class that has
    no lesion pixel in the split (there is nothing to tune on)."""
    thresholds = []
    notes = []
    for cls in curves.classes:
        if curves.positives(cls):
            thresholds.append(curves.best_threshold(cls))
        else:
            thresholds.append(default)
            notes.append(f"{cls}: no lesion pixels in this split; threshold left at {default}.")
    return tuple(thresholds), notes


def _without_nan(value: Any) -> Any:
    """NaN -> None throughout, so the JSON is valid and undefined values read as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(v) for v in value]
    return value


_NOTES = (
    "AUPR: area under one precision-recall curve over all pixels of the split inside the "
    "field of view (IDRiD sub-challenge 1; average-precision definition, probabilities in "
    "bins of 1/{bins}); null when the split has no lesion pixel of the class.",
    "dice, iou: dataset-level, true/false positives and false negatives summed over all "
    "pixels of the split; 1.0 when neither the truth nor the prediction has a lesion pixel.",
    "per_image_dice_mean: mean over the images whose ground truth has the class; images with "
    "empty ground truth are excluded (images_excluded_empty) because any false positive "
    "scores them 0; null when no image has the class.",
    "merged.dice: the any-lesion mask (union over classes of the truth against the union of "
    "the thresholded predictions), dataset-level.",
)


def _metrics(
    manifest: dataset.Manifest,
    split: str,
    images: int,
    curves: PixelCurves,
    scores: ThresholdedDice,
    thresholds: tuple[float, ...],
    notes: list[str],
) -> dict[str, Any]:
    per_class: dict[str, dict[str, Any]] = {}
    for cls, threshold in zip(curves.classes, thresholds, strict=True):
        dice, iou = curves.dice_iou_at(cls, threshold)
        per_class[cls] = {
            "aupr": curves.aupr(cls),
            "dice": dice,
            "iou": iou,
            "threshold": threshold_bin(threshold, curves.bins) / curves.bins,
            "per_image_dice_mean": scores.per_image_mean(cls),
            "images_with_lesion": len(scores.per_image[cls]),
            "images_excluded_empty": scores.excluded_empty[cls],
            "lesion_pixels": curves.positives(cls),
            "idrid_best_aupr": IDRID_BEST_AUPR.get(cls),
        }
    auprs = [m["aupr"] for m in per_class.values() if not math.isnan(m["aupr"])]
    return _without_nan(
        {
            "split": split,
            "images": images,
            "dataset_hash": manifest.dataset_hash,
            "classes": per_class,
            "mean_aupr": float(np.mean(auprs)) if auprs else math.nan,
            "merged": {"dice": scores.merged_dice()},
            "notes": [note.format(bins=curves.bins) for note in _NOTES] + notes,
        }
    )


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(metrics: dict[str, Any], overlays: list[str]) -> str:
    columns = (
        ("AUPR", "aupr"),
        ("IDRiD best AUPR", "idrid_best_aupr"),
        ("Dice", "dice"),
        ("IoU", "iou"),
        ("threshold", "threshold"),
        ("per-image Dice", "per_image_dice_mean"),
        ("images with lesion", "images_with_lesion"),
        ("excluded (empty truth)", "images_excluded_empty"),
    )
    lines = [
        f"# Lesion segmentation on the `{metrics['split']}` split",
        "",
        f"{metrics['images']} photographs, dataset `{metrics['dataset_hash'][:12]}`.",
        "",
        "| class | " + " | ".join(title for title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for cls, values in metrics["classes"].items():
        lines.append(f"| {cls} | " + " | ".join(_cell(values[k]) for _, k in columns) + " |")
    lines += [
        "",
        f"**Mean AUPR:** {_cell(metrics['mean_aupr'])}  ",
        f"**Merged any-lesion Dice:** {_cell(metrics['merged']['dice'])}",
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in metrics["notes"]),
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


def _infer_split(
    logits_fn: LogitsFn,
    root: Path,
    records: list[RecordEntry],
    classes: tuple[str, ...],
    settings: EvaluateSettings,
    device: torch.device | str,
    cache: Path,
) -> PixelCurves:
    """First pass: tiled inference per photograph into the curves; quantised
    probabilities cached as <cache>/<id>.npy for the second pass."""
    curves = PixelCurves(classes)
    for record in tqdm(records, desc="evaluate", unit="img", file=sys.stderr, disable=None):
        rgb = dataset.read_rgb(dataset.image_path(root, record.id))
        probs = predict_probabilities(
            logits_fn,
            image_to_tensor(rgb),
            settings.tile_size,
            settings.overlap,
            settings.batch_size,
            settings.tta_flips,
            device,
        ).numpy()
        fov = dataset.read_mask(dataset.fov_path(root, record.id))
        curves.update(probs, _read_truth(root, record, classes), fov)
        np.save(cache / f"{record.id}.npy", quantize(probs, curves.bins))
    return curves


def _score_thresholded(
    root: Path,
    records: list[RecordEntry],
    classes: tuple[str, ...],
    thresholds: tuple[float, ...],
    bins: int,
    cache: Path,
    overlays: int,
    work: Path,
) -> tuple[ThresholdedDice, list[str]]:
    """Second pass: per-image and merged Dice from the cached probabilities, and overlays
    of the first `overlays` photographs; returns the overlays' paths relative to `work`."""
    scores = ThresholdedDice(classes)
    overlay_names: list[str] = []
    for record in records:
        pred = binarize(np.load(cache / f"{record.id}.npy"), thresholds, bins)
        truth = _read_truth(root, record, classes)
        scores.update(pred, truth, dataset.read_mask(dataset.fov_path(root, record.id)))
        if len(overlay_names) < overlays:
            name = f"{OVERLAYS_DIR}/{record.id}.png"
            rgb = dataset.read_rgb(dataset.image_path(root, record.id))
            draw_overlay(rgb, truth, pred, classes, work / name)
            overlay_names.append(name)
    return scores, overlay_names


def evaluate_dataset(
    logits_fn: LogitsFn,
    dataset_dir: Path,
    out_dir: Path,
    classes: tuple[str, ...],
    settings: EvaluateSettings,
    split: str = "val",
    thresholds: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
) -> EvaluationResult:
    """Evaluate every photograph of `split` and write metrics.json, pr_curves.png,
    overlays/<id>.png and report.md into `out_dir` (a new or empty folder, completed
    atomically). `thresholds` None tunes one per class on this split."""
    root, out = Path(dataset_dir), Path(out_dir)
    manifest, records = _split_records(root, classes, split)
    given = None if thresholds is None else thresholds_tuple(classes, thresholds)
    with (
        atomic.output_dir(out) as work,
        tempfile.TemporaryDirectory(prefix="drseg-evaluate-") as cache_dir,
    ):
        cache = Path(cache_dir)
        curves = _infer_split(logits_fn, root, records, classes, settings, device, cache)
        if given is None:
            chosen, notes = _tuned_thresholds(curves, settings.default_threshold)
            notes.append(
                "Thresholds were tuned on this split for maximal dataset-level Dice, so its "
                "Dice and IoU are optimistic; AUPR does not depend on them."
            )
        else:
            chosen, notes = given, ["Thresholds were given, not tuned on this split."]
        scores, overlay_names = _score_thresholded(
            root, records, classes, chosen, curves.bins, cache, settings.overlays, work
        )
        metrics = _metrics(manifest, split, len(records), curves, scores, chosen, notes)
        atomic.write_text(
            work / METRICS_FILE, json.dumps(metrics, indent=2, allow_nan=False) + "\n"
        )
        plot_pr_curves(curves, work / PR_CURVES_FILE)
        atomic.write_text(work / REPORT_FILE, _markdown(metrics, overlay_names))
    return EvaluationResult(
        metrics=metrics,
        metrics_path=out / METRICS_FILE,
        plot_paths=(out / PR_CURVES_FILE,),
        overlay_paths=tuple(out / name for name in overlay_names),
        report_path=out / REPORT_FILE,
    )
