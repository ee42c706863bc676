import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from drseg.config import LESION_CLASSES, EvaluateSettings, GateSettings, IngestSettings
from drseg.data import dataset
from drseg.data.ingest import ingest
from drseg.evaluate.report import evaluate_dataset
from drseg.evaluate.schema import Metrics
from drseg.gate import evaluate_gate

SETTINGS = EvaluateSettings(folds=5, overlays=2)


@pytest.fixture(scope="module")
def ingested(synthetic_generic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "dataset"
    ingest(synthetic_generic, out, IngestSettings(working_width=128, workers=1))
    return out


def _truth(root: Path, record: dataset.RecordEntry) -> np.ndarray:
    width, height = record.size
    truth = np.zeros((len(LESION_CLASSES), height, width), bool)
    for c, cls in enumerate(LESION_CLASSES):
        if cls in record.masks:
            truth[c] = dataset.read_mask(dataset.mask_path(root, cls, record.id))
    return truth


class TruthScorer:
    """A 'model' that knows each photograph's ground truth and answers `high` on lesion
    pixels and `low` elsewhere (per photograph id), thresholded as the client does."""

    classes = LESION_CLASSES

    def __init__(self, root: Path, levels: dict[str, tuple[float, float]] | None = None) -> None:
        self.root = root
        self.levels = levels or {}

    def probabilities(self, photograph: Path) -> tuple[np.ndarray, np.ndarray]:
        record = next(
            r for r in dataset.load_manifest(self.root).records if r.id == photograph.stem
        )
        high, low = self.levels.get(record.id, (1.0, 0.0))
        probs = np.where(_truth(self.root, record), high, low).astype(np.float32)
        return probs, dataset.read_mask(dataset.fov_path(self.root, record.id))

    def masks(self, probs: np.ndarray, fov: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
        edges = np.array([thresholds[c] for c in self.classes])[:, None, None]
        return np.asarray((probs >= edges) & fov[None])


class Everywhere(TruthScorer):
    def probabilities(self, photograph: Path) -> tuple[np.ndarray, np.ndarray]:
        probs, fov = super().probabilities(photograph)
        return np.ones_like(probs), fov


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _evaluate(scorer: TruthScorer, root: Path, out: Path, **kwargs: object) -> Metrics:
    return evaluate_dataset(scorer, root, out, SETTINGS, "test scorer", **kwargs).metrics  # type: ignore[arg-type]


def test_a_perfect_model_scores_one_everywhere(ingested: Path, tmp_path: Path) -> None:
    manifest = dataset.load_manifest(ingested)
    train = [r for r in manifest.records if r.split == "train"]
    result = evaluate_dataset(
        TruthScorer(ingested), ingested, tmp_path / "eval", SETTINGS, "test scorer", "train"
    )
    metrics = result.metrics
    assert (metrics.split, metrics.images, metrics.scored) == ("train", len(train), "test scorer")
    assert (metrics.thresholds, metrics.folds) == ("cross_fitted", 5) and len(train) == 5
    for cls in LESION_CLASSES:
        values = metrics.classes[cls]
        # A mask file whose lesions all vanish at the working width (a 2-px microaneurysm
        # at 128 px) is ingested with 0 pixels: that photograph has no lesion to score.
        with_lesion = sum(cls in r.masks and r.masks[cls].pixels > 0 for r in train)
        assert values.aupr == 1.0, cls
        assert (values.dice, values.iou, values.per_image_dice_mean) == (1.0, 1.0, 1.0)
        assert values.threshold == 0.5
        assert values.lesion_pixels == sum(r.masks[cls].pixels for r in train if cls in r.masks)
        assert values.images_with_lesion == with_lesion
        assert values.images_excluded_empty == values.images_empty_both == len(train) - with_lesion
    assert metrics.classes["SE"].images_excluded_empty == 1  # synth_0005 has no SE
    assert metrics.merged.dice == 1.0 and metrics.mean_aupr == 1.0

    assert result.metrics_path == tmp_path / "eval" / "metrics.json"
    assert Metrics.model_validate(_strict_json(result.metrics_path)) == metrics
    assert cv2.imread(str(result.plot_paths[0])).shape[2] == 3
    assert [p.name for p in result.overlay_paths] == [f"{r.id}.png" for r in train[:2]]
    overlay = cv2.imread(str(result.overlay_paths[0]))
    assert overlay.shape[:2] == (85 + 28, 2 * 128)  # photograph | overlay, legend below
    report = result.report_path.read_text()
    assert "| class | AUPR | IDRiD best AUPR | Dice |" in report
    ma = metrics.classes["MA"]
    counts = f"{ma.images_with_lesion} | {ma.images_excluded_empty} | {ma.images_empty_both}"
    assert f"| MA | 1.000 | 0.500 | 1.000 | 1.000 | 0.500 | 1.000 | {counts} |" in report
    assert "| SE | 1.000 | 0.700 | 1.000 | 1.000 | 0.500 | 1.000 | 4 | 1 | 1 |" in report
    assert "cross-fitted over 5 folds" in report
    assert "**Merged any-lesion Dice:** 1.000" in report
    assert f"![{train[0].id}](overlays/{train[0].id}.png)" in report


def test_each_fold_is_scored_at_thresholds_tuned_on_the_others(
    ingested: Path, tmp_path: Path
) -> None:
    """Fold 0 answers (lesion 0.3, elsewhere 0.1), fold 1 (0.8, 0.5). Tuned on fold 1 the
    threshold lies above 0.5 and finds nothing in fold 0; tuned on fold 0 it is 0.3 and
    marks all of fold 1. A Dice tuned on the pixels it scores would be perfect here."""
    train = [r for r in dataset.load_manifest(ingested).records if r.split == "train"]
    levels = {r.id: ((0.3, 0.1) if i % 2 == 0 else (0.8, 0.5)) for i, r in enumerate(train)}
    settings = SETTINGS.model_copy(update={"folds": 2})
    metrics = evaluate_dataset(
        TruthScorer(ingested, levels), ingested, tmp_path / "eval", settings, "x", "train"
    ).metrics
    assert metrics.folds == 2
    for c, cls in enumerate(LESION_CLASSES):
        lesions, fov_pixels = [0, 0], [0, 0]
        for i, record in enumerate(train):
            fov = dataset.read_mask(dataset.fov_path(ingested, record.id))
            lesions[i % 2] += int((_truth(ingested, record)[c] & fov).sum())
            fov_pixels[i % 2] += int(fov.sum())
        tp, fp, fn = lesions[1], fov_pixels[1] - lesions[1], lesions[0]
        assert metrics.classes[cls].dice == pytest.approx(2 * tp / (2 * tp + fp + fn)), cls
        on_fold_1, on_fold_0 = metrics.classes[cls].fold_thresholds
        assert on_fold_1 > 0.5 and on_fold_0 == (0.3 if lesions[0] else 0.5)


def test_predicting_lesions_everywhere_at_given_thresholds(ingested: Path, tmp_path: Path) -> None:
    record = next(r for r in dataset.load_manifest(ingested).records if r.split == "val")
    fov = int(dataset.read_mask(dataset.fov_path(ingested, record.id)).sum())
    thresholds = dict.fromkeys(LESION_CLASSES, 0.5)
    metrics = _evaluate(Everywhere(ingested), ingested, tmp_path / "eval", thresholds=thresholds)
    assert (metrics.thresholds, metrics.folds) == ("given", 1)
    for cls in LESION_CLASSES:
        lesion = record.masks[cls].pixels
        values = metrics.classes[cls]
        assert values.aupr == pytest.approx(lesion / fov)  # one tied score: the share
        assert values.dice == pytest.approx(2 * lesion / (lesion + fov))
    assert "Thresholds were given, not tuned on this split." in metrics.notes


def _without_masks(ingested: Path, root: Path, drop: set[str]) -> Path:
    shutil.copytree(ingested, root)
    manifest = dataset.load_manifest(root)
    records = tuple(
        r.model_copy(update={"masks": {c: m for c, m in r.masks.items() if c not in drop}})
        for r in manifest.records
    )
    dataset.write_manifest(root, manifest.model_copy(update={"records": records}))
    return root


def test_a_class_without_lesions_reads_null(ingested: Path, tmp_path: Path) -> None:
    root = _without_masks(ingested, tmp_path / "no_se", {"SE"})
    result = evaluate_dataset(TruthScorer(root), root, tmp_path / "eval", SETTINGS, "x", "train")
    stored = _strict_json(result.metrics_path)["classes"]["SE"]
    assert stored["aupr"] is None and stored["per_image_dice_mean"] is None
    assert stored["dice"] is None and stored["iou"] is None  # nothing there, nothing found
    assert stored["images_excluded_empty"] == stored["images_empty_both"] == 5
    assert stored["lesion_pixels"] == 0
    assert stored["threshold"] == SETTINGS.default_threshold
    assert any(n.startswith("SE: no lesion pixels in the split") for n in result.metrics.notes)
    assert "| SE | n/a | 0.700 | n/a | n/a |" in result.report_path.read_text()


class Nothing(TruthScorer):
    def probabilities(self, photograph: Path) -> tuple[np.ndarray, np.ndarray]:
        probs, fov = super().probabilities(photograph)
        return np.zeros_like(probs), fov


def test_a_model_that_predicts_nothing_where_no_mask_was_found_fails_the_gate(
    ingested: Path, tmp_path: Path
) -> None:
    """The misnamed mask folder: no truth, the model finds nothing, and nothing passes."""
    root = _without_masks(ingested, tmp_path / "no_masks", set(LESION_CLASSES))
    metrics = _evaluate(Nothing(root), root, tmp_path / "eval", split="train")
    assert metrics.merged.dice is None
    assert all(m.dice is None for m in metrics.classes.values())
    verdict = evaluate_gate(metrics, GateSettings(), None)
    assert not verdict.passed
    assert "a missing value fails its rule" in verdict.rows[0].note


def test_a_model_that_predicts_nothing_on_lesions_fails_the_gate(
    ingested: Path, tmp_path: Path
) -> None:
    metrics = _evaluate(Nothing(ingested), ingested, tmp_path / "eval", split="train")
    assert metrics.merged.dice == 0.0
    assert not evaluate_gate(metrics, GateSettings(), None).passed


def test_wrong_classes_split_or_thresholds_are_refused(ingested: Path, tmp_path: Path) -> None:
    class Other(TruthScorer):
        classes = ("MA", "XX")

    with pytest.raises(ValueError, match=r"not \['XX'\]"):
        evaluate_dataset(Other(ingested), ingested, tmp_path / "a", SETTINGS, "x")
    scorer = TruthScorer(ingested)
    with pytest.raises(dataset.DatasetError, match="no records in split 'test'"):
        evaluate_dataset(scorer, ingested, tmp_path / "b", SETTINGS, "x", "test")
    with pytest.raises(dataset.DatasetError, match="cross-fitted thresholds need at least 2"):
        evaluate_dataset(scorer, ingested, tmp_path / "c", SETTINGS, "x", "val")
    with pytest.raises(ValueError, match=r"lack classes \['HE', 'EX', 'SE'\]"):
        evaluate_dataset(scorer, ingested, tmp_path / "d", SETTINGS, "x", thresholds={"MA": 0.5})
    assert not any(tmp_path.iterdir())
