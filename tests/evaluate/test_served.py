"""What the gate scores is what `drseg predict` gets back from a real Triton."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drseg.config import EvaluateSettings
from drseg.data import dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.evaluate.metrics import ThresholdedDice
from drseg.evaluate.report import evaluate_dataset
from drseg.evaluate.served import SCORED, ServedGraph, check_photographs
from drseg.serving.client import PhotoFailure, predict
from drseg.serving.server import running_server
from tests.export import INGEST, clahe_dataset_from
from tests.serving import MAX_INPUT_PIXELS, export_tiny, serve_settings, to_repository


def _read_masks(folder: Path, classes: tuple[str, ...]) -> np.ndarray:
    return np.stack([dataset.read_mask(folder / f"mask_{cls}.png") for cls in classes])


def test_the_gates_dice_is_what_predicts_masks_score(tmp_path: Path) -> None:
    """One tiny exported model, both paths: evaluation (ONNX Runtime on the ingest-stage
    photographs) and `drseg predict` on the ORIGINAL photographs through a local Triton."""
    write_synthetic_dataset(tmp_path / "source", n=4, seed=11, width=256)
    ingest(tmp_path / "source", tmp_path / "ingested", INGEST)
    onnx_path = to_repository(export_tiny(tmp_path / "export", INGEST), tmp_path / "repo")
    graph = ServedGraph(onnx_path)
    records = dataset.load_manifest(tmp_path / "ingested").records
    metrics = evaluate_dataset(
        graph,
        tmp_path / "ingested",
        tmp_path / "eval",
        EvaluateSettings(overlays=0),
        SCORED,
        split="train",
        thresholds=graph.contract.thresholds,
    ).metrics

    train = [r for r in records if r.split == "train"]
    settings = serve_settings(max_input_pixels=MAX_INPUT_PIXELS)
    with running_server(tmp_path / "repo", settings, log_file=tmp_path / "triton.log") as server:
        photos = [Path(r.source) for r in train]
        outcomes = list(predict(photos, server.http_url, "http", tmp_path / "predicted", onnx_path))
    assert not [o for o in outcomes if isinstance(o, PhotoFailure)], outcomes

    scores = ThresholdedDice(graph.classes)
    root = tmp_path / "ingested"
    for record in train:
        truth = np.zeros((len(graph.classes), record.size[1], record.size[0]), bool)
        for c, cls in enumerate(graph.classes):
            if cls in record.masks:
                truth[c] = dataset.read_mask(dataset.mask_path(root, cls, record.id))
        served = _read_masks(tmp_path / "predicted" / Path(record.source).stem, graph.classes)
        scores.update(served, truth, dataset.read_mask(dataset.fov_path(root, record.id)))
    for cls in graph.classes:
        dice = scores.dice_iou(cls)[0]
        assert 0 < dice < 1, f"{cls}: the tiny model's masks should be neither empty nor exact"
        assert metrics.classes[cls].dice == pytest.approx(dice, abs=1e-12), cls
    assert metrics.merged.dice == pytest.approx(scores.merged_dice(), abs=1e-12)


def test_only_what_predict_is_sent_is_scored(tmp_path: Path) -> None:
    """The served path applies CLAHE itself (a CLAHE-stage photograph would get it twice)
    and resizes to the graph's working width (the truth must be at that width)."""
    write_synthetic_dataset(tmp_path / "source", n=3, seed=2, width=256)
    enhanced = clahe_dataset_from(tmp_path / "source", tmp_path)
    onnx_path = export_tiny(tmp_path / "export", INGEST)
    contract = ServedGraph(onnx_path).contract
    with pytest.raises(ValueError, match="CLAHE-stage dataset; pass the ingest-stage dataset"):
        check_photographs(enhanced, contract, onnx_path)
    other_width = contract.model_copy(update={"working_width": 256})
    with pytest.raises(ValueError, match=r"photographs at working width 192, but .* serves 256"):
        check_photographs(tmp_path / "ingested", other_width, onnx_path)
    check_photographs(tmp_path / "ingested", contract, onnx_path)
