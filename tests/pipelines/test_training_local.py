"""The training pipeline end to end through kfp.local, as `drseg run` runs it."""

import json
from pathlib import Path

import pytest

from drseg.config import Settings, load_settings
from drseg.data import dataset
from drseg.run import format_run_summary, run_pipeline


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        environ={
            "DRSEG_HOME": str(tmp_path / "home"),
            "DRSEG_SYNTH__N": "4",
            "DRSEG_SYNTH__WIDTH": "256",
            "DRSEG_INGEST__WORKING_WIDTH": "128",
            "DRSEG_MODEL__ENCODER": "resnet18",
            "DRSEG_FINETUNE__PATCH_SIZE": "64",
            "DRSEG_FINETUNE__BATCH_SIZE": "2",
            "DRSEG_FINETUNE__MAX_STEPS": "2",
            "DRSEG_FINETUNE__WARMUP_STEPS": "1",
            "DRSEG_FINETUNE__NUM_WORKERS": "0",
            "DRSEG_EVALUATE__TILE_SIZE": "64",
            "DRSEG_EVALUATE__TTA_FLIPS": "false",
        }
    )


def test_run_synthetic_pipeline_writes_summary_and_datasets(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_pipeline(settings)
    assert (settings.home / "runs" / "latest").resolve() == run.resolve()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("synth", "success"),
        ("ingest", "success"),
        ("clahe", "success"),
        ("finetune", "success"),
        ("evaluate", "success"),
    ]
    ingest, clahe, trained, evaluated = (s["outputs"] for s in summary["steps"][1:])
    assert ingest["dataset"]["metadata"]["records"] == 4
    ingested = dataset.load_manifest(Path(ingest["dataset"]["path"]))
    enhanced = dataset.load_manifest(Path(clahe["enhanced"]["path"]))
    assert ingest["Output"] == ingested.dataset_hash == enhanced.parent_hash
    assert clahe["Output"] == enhanced.dataset_hash
    assert ingested.records[0].size == (128, 85)
    model_dir = Path(trained["model"]["path"])
    assert (model_dir / "model.pt").is_file() and (model_dir / "model.json").is_file()
    assert trained["model"]["metadata"]["steps"] == 2
    metrics = json.loads((Path(evaluated["evaluation"]["path"]) / "metrics.json").read_text())
    assert set(metrics["classes"]) == {"MA", "HE", "EX", "SE"}
    assert evaluated["Output"] == metrics["merged"]["dice"]
    assert "MA.aupr" in evaluated["metrics"]["metadata"] or metrics["classes"]["MA"]["aupr"] is None
    assert "| MA |" in Path(evaluated["report"]["path"]).read_text()
    # Both training stages are MLflow runs nested under one parent for this pipeline run.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{settings.home.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("drseg").experiment_id])
    children = {r.data.tags["drseg.stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {"finetune", "evaluate"}
    assert len({r.data.tags["mlflow.parentRunId"] for r in children.values()}) == 1
    assert children["finetune"].data.tags["drseg.dataset_hash"] == enhanced.dataset_hash
    printed = capsys.readouterr().out
    assert "ingest       success" in printed and "Executor" not in printed
    table = format_run_summary(summary, run)
    assert "evaluate (validation split)" in table and "any-lesion Dice" in table
    assert "records" in (run / "pipeline.log").read_text()


def test_failed_step_is_recorded_not_raised(settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_pipeline(settings, source=str(empty))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("ingest", "failure")]
    assert "ingest" in summary["error"]
    assert "only 0 valid records" in (run / "pipeline.log").read_text()
