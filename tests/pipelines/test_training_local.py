"""The training pipeline end to end through kfp.local, as `drseg run` runs it."""

import json
from pathlib import Path

import pytest

from drseg.config import Settings, load_settings
from drseg.data import dataset
from drseg.run import run_pipeline


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        environ={
            "DRSEG_HOME": str(tmp_path / "home"),
            "DRSEG_SYNTH__N": "4",
            "DRSEG_SYNTH__WIDTH": "256",
            "DRSEG_INGEST__WORKING_WIDTH": "128",
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
    ]
    ingest, clahe = summary["steps"][1]["outputs"], summary["steps"][2]["outputs"]
    assert ingest["dataset"]["metadata"]["records"] == 4
    ingested = dataset.load_manifest(Path(ingest["dataset"]["path"]))
    enhanced = dataset.load_manifest(Path(clahe["enhanced"]["path"]))
    assert ingest["Output"] == ingested.dataset_hash == enhanced.parent_hash
    assert clahe["Output"] == enhanced.dataset_hash
    assert ingested.records[0].size == (128, 85)
    printed = capsys.readouterr().out
    assert "ingest       success" in printed and "Executor" not in printed
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
