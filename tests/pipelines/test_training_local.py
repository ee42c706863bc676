"""The training pipeline end to end through kfp.local, as `drseg run` runs it."""

import io
import json
from pathlib import Path

import pytest

from drseg.config import Settings, load_settings
from drseg.contract import read_contract
from drseg.data import dataset
from drseg.errors import UserError
from drseg.evaluate.schema import Metrics
from drseg.pipeline import pipeline_arguments
from drseg.run import _TaskLog, format_run_summary, run_pipeline
from drseg.tracking import NO_STAGE_RUN
from tests.ports import free_ports


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    http, grpc, metrics = free_ports(3)
    return load_settings(
        environ={
            "DRSEG_SERVE__HTTP_PORT": str(http),
            "DRSEG_SERVE__GRPC_PORT": str(grpc),
            "DRSEG_SERVE__METRICS_PORT": str(metrics),
            "DRSEG_HOME": str(tmp_path / "home"),
            "DRSEG_SYNTH__N": "4",
            "DRSEG_SYNTH__POOL_N": "3",
            "DRSEG_SYNTH__WIDTH": "256",
            "DRSEG_INGEST__WORKING_WIDTH": "128",
            "DRSEG_MODEL__ENCODER": "resnet18",
            "DRSEG_PRETRAIN__CROP_SIZE": "64",
            "DRSEG_PRETRAIN__BATCH_SIZE": "4",
            "DRSEG_PRETRAIN__MAX_STEPS": "2",
            "DRSEG_PRETRAIN__WARMUP_STEPS": "1",
            "DRSEG_PRETRAIN__NUM_WORKERS": "0",
            "DRSEG_FINETUNE__PATCH_SIZE": "64",
            "DRSEG_FINETUNE__BATCH_SIZE": "2",
            "DRSEG_FINETUNE__MAX_STEPS": "2",
            "DRSEG_FINETUNE__WARMUP_STEPS": "1",
            # Two validation photographs: cross-fitting needs at least two folds.
            "DRSEG_INGEST__VAL_FRACTION": "0.5",
            # A 2-step model cannot reach the default gate (merged Dice >= 0.8, class
            # floors); this test is about the plumbing of a passing run, so its gate asks
            # for nothing (an undefined Dice would still fail it).
            "DRSEG_GATE__MINIMUM": "0.0",
            "DRSEG_GATE__CLASS_MINIMUMS": "{}",
            "DRSEG_EXPORT__PARITY_TOLERANCE": "0.001",
        }
    )


def test_run_synthetic_pipeline_writes_summary_and_datasets(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pretraining on the labelled train split too: the pipeline built with that input."""
    pretrain = settings.pretrain.model_copy(update={"include_labelled": True})
    settings = settings.model_copy(update={"pretrain": pretrain})
    run = run_pipeline(settings)
    assert (settings.home / "runs" / "latest").resolve() == run.resolve()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    steps = {s["name"]: s for s in summary["steps"]}
    assert {name: s["status"] for name, s in steps.items()} == {
        name: "success"
        for name in (
            "synth",
            "fingerprint",
            "ingest",
            "clahe",
            "pool-fingerprint",
            "pool-ingest",
            "pool-clahe",
            "pretrain",
            "finetune",
            "export",
            "evaluate",
            "gate",
            "register",
            "tensorrt",
            "triton-repository",
            "close-runs",
            "serve",
        )
    }
    order = [s["name"] for s in summary["steps"]]
    # The gate scores the exported graph: export comes before evaluate.
    assert order.index("pretrain") < order.index("finetune") < order.index("export")
    assert order.index("export") < order.index("evaluate") < order.index("gate")
    assert order.index("gate") < order.index("register")
    # No TensorRT here: the ONNX model is served, and the summary says why.
    assert summary["served"]["format"] == "onnx"
    assert "no TensorRT engine built" in summary["served"]["reason"]
    repository = Path(steps["triton-repository"]["outputs"]["repository"]["path"])
    version = steps["register"]["outputs"]["Output"]
    assert version == 1
    assert (repository / "drseg" / "1" / "model.onnx").is_file()
    assert 'platform: "onnxruntime_onnx"' in (repository / "drseg" / "config.pbtxt").read_text()
    ingest, clahe, trained, evaluated = (
        steps[name]["outputs"] for name in ("ingest", "clahe", "finetune", "evaluate")
    )
    assert ingest["dataset"]["metadata"]["records"] == 4
    pool = steps["pool-ingest"]["outputs"]["dataset"]["metadata"]
    assert (pool["layout"], pool["records"], pool["val"]) == ("unlabelled", 3, 0)
    # Fine-tuning started from the encoder the pretrain step wrote.
    encoder = Path(steps["pretrain"]["outputs"]["encoder"]["path"]) / "encoder.pt"
    card = json.loads((Path(trained["model"]["path"]) / "model.json").read_text())
    assert card["encoder_init"] == dataset.sha256(encoder.read_bytes())
    pool_hash = steps["pool-clahe"]["outputs"]["Output"]
    pretrained_on = steps["pretrain"]["outputs"]["encoder"]["metadata"]["dataset_hash"]
    assert pretrained_on == dataset.content_hash([pool_hash, steps["clahe"]["outputs"]["Output"]])
    ingested = dataset.load_manifest(Path(ingest["dataset"]["path"]))
    enhanced = dataset.load_manifest(Path(clahe["enhanced"]["path"]))
    assert ingest["Output"] == ingested.dataset_hash == enhanced.parent_hash
    assert clahe["Output"] == enhanced.dataset_hash
    assert ingested.records[0].size == (128, 85)
    model_dir = Path(trained["model"]["path"])
    assert (model_dir / "model.pt").is_file() and (model_dir / "model.json").is_file()
    assert trained["model"]["metadata"]["steps"] == 2
    evaluation = Path(evaluated["evaluation"]["path"])
    metrics = Metrics.read(evaluation / "metrics.json")
    assert set(metrics.classes) == {"MA", "HE", "EX", "SE"}
    assert (metrics.thresholds, metrics.folds, metrics.images) == ("cross_fitted", 2, 2)
    assert metrics.dataset_hash == ingested.dataset_hash  # the photographs predict is sent
    assert evaluated["Output"] == (-1.0 if metrics.merged.dice is None else metrics.merged.dice)
    assert (evaluation / "no_champion.txt").read_text() == "drseg-lesions has no @champion yet\n"
    # The run's page in the KFP UI: the report with its images inline (no relative links,
    # which the UI cannot follow), and the per-class numbers as KFP metrics.
    shown = Path(evaluated["report"]["path"]).read_text()
    assert "| MA |" in shown and ".png)" not in shown
    assert "data:image/png;base64," in shown and "data:image/jpeg;base64," in shown
    assert evaluated["metrics"]["metadata"] == metrics.scalars()
    assert {"MA.aupr", "HE.aupr", "EX.aupr"} <= set(metrics.scalars())
    # What was registered and served is the graph the gate scored, with the shipped
    # thresholds in its contract.
    served_graph = repository / "drseg" / "1" / "model.onnx"
    assert read_contract(served_graph).thresholds == metrics.shipped_thresholds()
    # Both training stages are MLflow runs nested under one parent for this pipeline run.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{settings.home.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("drseg").experiment_id])
    children = {r.data.tags["drseg.stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {"pretrain", "finetune", "evaluate", "gate", "register"}
    # Pretraining is cached across pipeline runs, so its run groups by its inputs instead.
    parents = {stage: r.data.tags["drseg.pipeline_run_id"] for stage, r in children.items()}
    assert parents["pretrain"].startswith("pretrain-")
    assert len({parents[s] for s in ("finetune", "evaluate", "gate", "register")}) == 1
    assert children["gate"].data.tags["drseg.gate"] == "passed (1 rule, 1 not applicable)"
    registered = client.get_model_version_by_alias("drseg-lesions", "challenger")
    assert str(registered.version) == "1"
    assert children["finetune"].data.tags["drseg.dataset_hash"] == enhanced.dataset_hash
    # The registered version was served on a local Triton and a val photograph predicted.
    served = summary["served"]
    assert served["version"] == 1 and served["latency_ms_median"] > 0
    predicted = sorted(Path(served["predictions"]).iterdir())
    assert served["predicted"] == len(predicted) == ingest["dataset"]["metadata"]["val"]
    lesions = json.loads((predicted[0] / "lesions.json").read_text())
    assert lesions["model"]["version"] == 1
    assert {"overlay.png", "mask_MA.png", "mask_SE.png"} <= {p.name for p in predicted[0].iterdir()}
    printed = capsys.readouterr().out
    assert "ingest       success" in printed and "Executor" not in printed
    table = format_run_summary(summary, run)
    assert "evaluate (validation split; the exported graph" in table and "any-lesion Dice" in table
    assert "records" in (run / "pipeline.log").read_text()


def test_a_failed_gate_ends_the_run_gated_and_registers_nothing(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default gate (merged Dice >= 0.8) against a 2-step model: a clean stop."""
    strict = settings.model_copy(
        update={
            "gate": settings.gate.model_copy(update={"minimum": 0.8}),
            "pretrain": settings.pretrain.model_copy(update={"enabled": False}),
            "synth": settings.synth.model_copy(update={"n": 4}),
        }
    )
    run = run_pipeline(strict)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "gated"
    assert "merged any-lesion Dice" in summary["reason"]
    assert "nothing was registered" in summary["reason"]
    names = [s["name"] for s in summary["steps"]]
    assert "gate" in names and not {"register", "triton-repository"} & set(names)
    pretrain = next(s for s in summary["steps"] if s["name"] == "pretrain")
    assert pretrain["outputs"]["encoder"]["metadata"]["skipped"] is True
    table = format_run_summary(summary, run)
    assert "| merged any-lesion Dice | ≥ 0.8000 |" in table and "**fail**" in table


def test_failed_step_is_recorded_not_raised(settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_pipeline(settings, source=str(empty), pool=str(empty))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert ("ingest", "failure") in [(s["name"], s["status"]) for s in summary["steps"]]
    assert "ingest" in summary["error"]
    assert "only 0 valid records" in (run / "pipeline.log").read_text()
    # The exit handler ran (kfp.local runs dsl.ExitHandler with the final status) and, no
    # stage having opened an MLflow run yet, recorded the failed pipeline in one of its own.
    assert ("close-runs", "success") in [(s["name"], s["status"]) for s in summary["steps"]]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{settings.home.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    assert experiment is not None
    [pipeline] = client.search_runs([experiment.experiment_id], "tags.`drseg.kind` = 'pipeline'")
    assert pipeline.info.status == "FAILED"
    assert pipeline.data.tags["drseg.pipeline_state"] == "FAILED"
    assert pipeline.data.tags["drseg.failed_step"] == NO_STAGE_RUN


def test_a_source_without_a_pool_needs_pretraining_off(settings: Settings) -> None:
    with pytest.raises(UserError, match="--pool"):
        run_pipeline(settings, source="/data/idrid")
    assert not (settings.home / "runs").exists()
    random_init = settings.model_copy(
        update={"pretrain": settings.pretrain.model_copy(update={"enabled": False})}
    )
    arguments = pipeline_arguments(random_init, "/data/idrid", None)
    assert arguments["pool_source"] == "/data/idrid"
    assert json.loads(arguments["pretrain_config"])["enabled"] is False
    with_pool = pipeline_arguments(settings, "/data/idrid", "/data/pool")
    pool_ingest = json.loads(with_pool["pool_ingest_config"])
    assert (pool_ingest["layout"], pool_ingest["val_fraction"]) == ("unlabelled", 0.0)


def test_the_terminal_gets_task_lines_and_training_progress() -> None:
    """Everything goes to the log file; the terminal gets a line per task start and end and
    the training stages' progress lines, under the task's display name."""
    log, terminal = io.StringIO(), io.StringIO()
    tee = _TaskLog(log, terminal, verbose=False, display={"ingest-2": "pool-ingest"})
    stream = (
        "08:33:25 - INFO - Executing task \x1b[96m'ingest-2'\x1b[0m\n"
        "noise from the component\n"
        "INFO step 40/400: loss 0.8123, 1.50 s/step, about 540 s left\n"
        "08:33:27 - INFO - Task \x1b[96m'ingest-2'\x1b[0m finished with status "
        "\x1b[92mSUCCESS\x1b[0m\n"
    )
    for part in (stream[:50], stream[50:]):  # lines may arrive in pieces
        tee.write(part)
    lines = terminal.getvalue().splitlines()
    assert lines[0] == "  pool-ingest  running ..."
    assert lines[1] == "  pool-ingest  step 40/400: loss 0.8123, 1.50 s/step, about 540 s left"
    assert lines[2].startswith("  pool-ingest  success in ")
    assert log.getvalue() == stream
