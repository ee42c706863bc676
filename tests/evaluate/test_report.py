import json
import shutil
from pathlib import Path

import cv2
import pytest
import torch

from drseg.config import LESION_CLASSES, EvaluateSettings, IngestSettings
from drseg.data import dataset
from drseg.data.ingest import ingest
from drseg.evaluate.report import evaluate_dataset
from drseg.evaluate.tiling import LogitsFn
from drseg.models.normalize import image_to_tensor

# 128 x 85 photographs: one 128-px tile each (85 rows padded to 96), flips included.
SETTINGS = EvaluateSettings(tile_size=128, overlap=0.5, batch_size=2, tta_flips=True, overlays=2)


@pytest.fixture(scope="module")
def ingested(synthetic_generic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "dataset"
    ingest(synthetic_generic, out, IngestSettings(working_width=128, workers=1))
    return out


def _truth(root: Path, record: dataset.RecordEntry) -> torch.Tensor:
    width, height = record.size
    truth = torch.zeros((len(LESION_CLASSES), height, width), dtype=torch.bool)
    for c, cls in enumerate(LESION_CLASSES):
        if cls in record.masks:
            truth[c] = torch.from_numpy(dataset.read_mask(dataset.mask_path(root, cls, record.id)))
    return truth


def cheating_logits(root: Path) -> LogitsFn:
    """A 'model' that recognises each photograph and answers its ground truth as +-10 logits,
    whichever way the tile is flipped; the padding below and right of it gets -10."""
    known = [
        (image_to_tensor(dataset.read_rgb(dataset.image_path(root, r.id))), _truth(root, r))
        for r in dataset.load_manifest(root).records
    ]

    def answer(tile: torch.Tensor) -> torch.Tensor:
        for dims in ((), (1,), (2,), (1, 2)):
            upright = tile.flip(dims)
            for image, truth in known:
                height, width = image.shape[1:]
                if torch.equal(upright[:, :height, :width], image):
                    logits = torch.full((len(LESION_CLASSES), *tile.shape[1:]), -10.0)
                    logits[:, :height, :width] = truth.float() * 20 - 10
                    return logits.flip(dims)
        raise AssertionError("the tile matches no photograph of the dataset")

    return lambda batch: torch.stack([answer(tile) for tile in batch])


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_perfect_model_scores_one_everywhere(ingested: Path, tmp_path: Path) -> None:
    manifest = dataset.load_manifest(ingested)
    train = [r for r in manifest.records if r.split == "train"]
    result = evaluate_dataset(
        cheating_logits(ingested), ingested, tmp_path / "eval", LESION_CLASSES, SETTINGS, "train"
    )
    metrics = result.metrics
    assert metrics["split"] == "train" and metrics["images"] == len(train) == 5
    for cls in LESION_CLASSES:
        values = metrics["classes"][cls]
        with_lesion = sum(cls in r.masks for r in train)
        assert values["aupr"] == 1.0, cls
        assert (values["dice"], values["iou"], values["per_image_dice_mean"]) == (1.0, 1.0, 1.0)
        assert values["threshold"] == 0.5
        assert values["lesion_pixels"] == sum(r.masks[cls].pixels for r in train if cls in r.masks)
        assert values["images_with_lesion"] == with_lesion
        assert values["images_excluded_empty"] == len(train) - with_lesion
    assert metrics["classes"]["SE"]["images_excluded_empty"] == 1  # synth_0005 has no SE
    assert metrics["merged"]["dice"] == 1.0 and metrics["mean_aupr"] == 1.0

    assert result.metrics_path == tmp_path / "eval" / "metrics.json"
    assert _strict_json(result.metrics_path) == metrics
    assert cv2.imread(str(result.plot_paths[0])).shape[2] == 3
    assert [p.name for p in result.overlay_paths] == [f"{r.id}.png" for r in train[:2]]
    overlay = cv2.imread(str(result.overlay_paths[0]))
    assert overlay.shape[:2] == (85 + 28, 2 * 128)  # photograph | overlay, legend below
    report = result.report_path.read_text()
    assert "| class | AUPR | IDRiD best AUPR | Dice |" in report
    assert "| MA | 1.000 | 0.500 | 1.000 | 1.000 | 0.500 | 1.000 | 5 | 0 |" in report
    assert "| SE | 1.000 | 0.700 | 1.000 | 1.000 | 0.500 | 1.000 | 4 | 1 |" in report
    assert "**Merged any-lesion Dice:** 1.000" in report
    assert f"![{train[0].id}](overlays/{train[0].id}.png)" in report
    assert "![precision-recall curves](pr_curves.png)" in report
    assert "excluded" in " ".join(metrics["notes"])


def test_predicting_lesions_everywhere_scores_the_lesion_share(
    ingested: Path, tmp_path: Path
) -> None:
    record = next(r for r in dataset.load_manifest(ingested).records if r.split == "val")
    fov = int(dataset.read_mask(dataset.fov_path(ingested, record.id)).sum())

    def everywhere(batch: torch.Tensor) -> torch.Tensor:
        return torch.full((batch.shape[0], 4, *batch.shape[2:]), 10.0)

    thresholds = dict.fromkeys(LESION_CLASSES, 0.5)
    result = evaluate_dataset(
        everywhere, ingested, tmp_path / "eval", LESION_CLASSES, SETTINGS, "val", thresholds
    )
    for cls in LESION_CLASSES:
        lesion = record.masks[cls].pixels
        values = result.metrics["classes"][cls]
        assert values["aupr"] == pytest.approx(lesion / fov)  # one tied score: the share
        assert values["dice"] == pytest.approx(2 * lesion / (lesion + fov))
    assert "Thresholds were given, not tuned on this split." in result.metrics["notes"]


def test_a_class_without_lesions_reads_null(ingested: Path, tmp_path: Path) -> None:
    root = tmp_path / "no_se"
    shutil.copytree(ingested, root)
    manifest = dataset.load_manifest(root)
    records = tuple(
        r.model_copy(update={"masks": {c: m for c, m in r.masks.items() if c != "SE"}})
        for r in manifest.records
    )
    dataset.write_manifest(root, manifest.model_copy(update={"records": records}))

    result = evaluate_dataset(
        cheating_logits(root), root, tmp_path / "eval", LESION_CLASSES, SETTINGS, "val"
    )
    stored = _strict_json(result.metrics_path)["classes"]["SE"]
    assert stored["aupr"] is None and stored["per_image_dice_mean"] is None
    assert stored["images_excluded_empty"] == 1 and stored["lesion_pixels"] == 0
    assert stored["dice"] == 1.0  # nothing there, nothing predicted
    assert stored["threshold"] == SETTINGS.default_threshold
    assert any(n.startswith("SE: no lesion pixels") for n in result.metrics["notes"])
    assert "| SE | n/a |" in result.report_path.read_text()


def test_wrong_classes_split_or_thresholds_are_refused(ingested: Path, tmp_path: Path) -> None:
    fn = cheating_logits(ingested)
    with pytest.raises(ValueError, match=r"not \['XX'\]"):
        evaluate_dataset(fn, ingested, tmp_path / "a", ("MA", "XX"), SETTINGS)
    with pytest.raises(dataset.DatasetError, match="no records in split 'test'"):
        evaluate_dataset(fn, ingested, tmp_path / "b", LESION_CLASSES, SETTINGS, "test")
    with pytest.raises(ValueError, match=r"lack classes \['HE', 'EX', 'SE'\]"):
        evaluate_dataset(
            fn, ingested, tmp_path / "c", LESION_CLASSES, SETTINGS, thresholds={"MA": 0.5}
        )
    assert not any(tmp_path.iterdir())
