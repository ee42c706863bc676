"""The pipeline steps' own logic: what the pretrain step hands to fine-tuning, and the
champion's graph scored beside the challenger's on the same photographs."""

from pathlib import Path

import pytest
import torch

from drseg.artifacts import ENCODER_FILE
from drseg.config import (
    EvaluateSettings,
    ExportSettings,
    GateSettings,
    ModelSettings,
    PretrainSettings,
    RegistrySettings,
    TrackingSettings,
)
from drseg.contract import read_contract
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.export.onnx_export import export_onnx
from drseg.gate import evaluate_gate
from drseg.registry import promote, register_model
from drseg.steps import (
    EvaluateOutcome,
    evaluate_step,
    pretrain_step,
    pretrained_encoder,
    read_evaluation,
)
from drseg.tracking import stage_run, tracking_uri
from tests.export import CLAHE, INGEST, THRESHOLDS, write_tiny_model
from tests.test_registry import GATE, one_class_metrics

TRACKING = TrackingSettings(experiment="steps")
REGISTRY = RegistrySettings(model_name="steps-lesions")


def test_pretraining_off_hands_random_init_to_finetune(tmp_path: Path) -> None:
    out = tmp_path / "pretrain"
    figures = pretrain_step(
        [tmp_path / "no-pool-needed"],
        None,
        out,
        ModelSettings(),
        PretrainSettings(enabled=False),
        TrackingSettings(enabled=False),
        tmp_path,
        "p-1",
    )
    assert figures["skipped"] is True
    assert pretrained_encoder(out) is None
    assert not (out / ENCODER_FILE).exists()


def test_a_folder_without_encoder_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no encoder\.pt; pass the output folder"):
        pretrained_encoder(tmp_path)
    (tmp_path / ENCODER_FILE).write_bytes(b"weights")
    assert pretrained_encoder(tmp_path) == tmp_path / ENCODER_FILE


def _write_blind_model(folder: Path) -> None:
    """The tiny model with its segmentation bias at -20: it finds no lesion anywhere."""
    write_tiny_model(folder)
    weights = torch.load(folder / "model.pt")
    weights["unet.segmentation_head.0.bias"].fill_(-20.0)
    torch.save(weights, folder / "model.pt")


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with an ingest-stage dataset (three validation photographs), two exports
    (`seeing`: the tiny model; `blind`: one that finds nothing) and both registered (versions
    1 = blind, 2 = seeing) in its MLflow registry."""
    home = tmp_path_factory.mktemp("champion")
    write_synthetic_dataset(home / "source", n=6, seed=9, width=256)
    ingest(home / "source", home / "ingested", INGEST.model_copy(update={"val_fraction": 0.5}))
    _write_blind_model(home / "model-blind")
    write_tiny_model(home / "model-seeing")
    uri = tracking_uri(TRACKING, home)
    for name in ("blind", "seeing"):
        export_onnx(home / f"model-{name}", THRESHOLDS, home / name / "model.onnx",
                    ExportSettings(), INGEST, CLAHE)  # fmt: skip
        with stage_run(TRACKING, home, "register", pipeline_run_id="p-0") as run:
            register_model(
                uri, REGISTRY.model_name, home / name / "model.onnx",
                home / f"model-{name}" / "model.pt", run_id=run.run_id, dataset_hash="d" * 64,
                metrics=one_class_metrics(), verdict=evaluate_gate(one_class_metrics(), GATE, None),
                git_commit="abc", pipeline_run_id="p-0",
            )  # fmt: skip
    return home


def _evaluate(home: Path, challenger: str, champion: int, out: str) -> EvaluateOutcome:
    promote(tracking_uri(TRACKING, home), REGISTRY.model_name, champion)
    return evaluate_step(
        home / challenger, home / "ingested", home / out, home / f"{out}-served",
        EvaluateSettings(overlays=0), REGISTRY, TRACKING, home, "p-1",
    )  # fmt: skip


NO_FLOORS = GateSettings(minimum=0.0, class_minimums={}, max_regression=0.0)
"""Only the regression rule can fail, at any drop: the untrained tiny model's Dice is low."""


def test_evaluate_scores_the_champion_graph_on_the_same_photographs(registry_home: Path) -> None:
    """The champion's own graph as challenger: the same code on the same photographs gives
    the same numbers, so the regression rule compares like with like."""
    outcome = _evaluate(registry_home, "seeing", 2, "same")
    assert outcome.champion is not None and outcome.champion.model_version == 2
    assert outcome.champion.model_copy(update={"model_version": None}) == outcome.metrics
    metrics, champion, _ = read_evaluation(registry_home / "same")
    assert (metrics, champion) == (outcome.metrics, outcome.champion)
    assert evaluate_gate(metrics, NO_FLOORS, champion).passed
    # The served graph is the challenger's with the thresholds it shipped.
    served = read_contract(registry_home / "same-served" / "model.onnx")
    assert served.thresholds == metrics.shipped_thresholds()


def test_a_challenger_worse_than_the_champion_fails_and_a_better_one_passes(
    registry_home: Path,
) -> None:
    better = _evaluate(registry_home, "seeing", 1, "better")  # champion: the blind model
    assert better.champion is not None and better.champion.merged.dice == 0.0
    assert better.metrics.merged.dice is not None and better.metrics.merged.dice > 0.0
    assert evaluate_gate(better.metrics, NO_FLOORS, better.champion).passed

    worse = _evaluate(registry_home, "blind", 2, "worse")  # champion: the seeing model
    verdict = evaluate_gate(worse.metrics, NO_FLOORS, worse.champion)
    assert not verdict.passed
    failed = [row.rule for row in verdict.rows if row.passed is False]
    assert "merged any-lesion Dice vs @champion v2 (max drop 0)" in failed


def test_without_tracking_there_is_no_champion_and_the_row_says_why(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "source", n=4, seed=9, width=256)
    ingest(
        tmp_path / "source", tmp_path / "ingested", INGEST.model_copy(update={"val_fraction": 0.5})
    )
    write_tiny_model(tmp_path / "model")
    export_onnx(tmp_path / "model", THRESHOLDS, tmp_path / "export" / "model.onnx",
                ExportSettings(), INGEST, CLAHE)  # fmt: skip
    off = TrackingSettings(enabled=False)
    outcome = evaluate_step(
        tmp_path / "export", tmp_path / "ingested", tmp_path / "eval", tmp_path / "served",
        EvaluateSettings(overlays=0), REGISTRY, off, tmp_path, "p-1",
    )  # fmt: skip
    assert outcome.champion is None
    _, champion, reason = read_evaluation(tmp_path / "eval")
    assert champion is None and reason.startswith("tracking is off")
    verdict = evaluate_gate(outcome.metrics, GateSettings(), None, reason)
    assert verdict.rows[-1].note == f"not applicable: {reason}"
    (tmp_path / "eval" / "no_champion.txt").unlink()
    with pytest.raises(FileNotFoundError, match="whether @champion was scored is unknown"):
        read_evaluation(tmp_path / "eval")
