"""Stage runs on the embedded default (a SQLite file in the workspace), read back with mlflow."""

from __future__ import annotations

import math
import re
import socket
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from drseg import tracking
from drseg.config import FinetuneSettings, ModelSettings, TrackingSettings
from drseg.tracking import NullRun, StageRun, git_commit, stage_run, tracking_uri


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace for the module: creating an MLflow database takes seconds; not created
    here, so the first stage run has to create it."""
    return tmp_path_factory.mktemp("tracking") / "home"


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> TrackingSettings:
    """An experiment of the test's own, so tests sharing the workspace never see each other."""
    return TrackingSettings(experiment=request.node.name)


def _client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home.resolve()}/mlflow.db")


def _pipeline_runs(client: MlflowClient, experiment: str, pipeline_run_id: str) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    query = f"tags.`drseg.kind` = 'pipeline' and tags.`drseg.pipeline_run_id` = '{pipeline_run_id}'"
    return list(client.search_runs([found.experiment_id], query))


def _stage(
    settings: TrackingSettings,
    home: Path,
    name: str,
    pipeline_run_id: str = "p-1",
    dataset_hash: str | None = None,
) -> StageRun:
    """Runs an empty stage and returns it (ended by then)."""
    with stage_run(
        settings, home, name, pipeline_run_id=pipeline_run_id, dataset_hash=dataset_hash
    ) as run:
        assert isinstance(run, StageRun)
    return run


def test_default_uri_is_a_sqlite_file_in_the_workspace(tmp_path: Path) -> None:
    assert tracking_uri(TrackingSettings(), tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    remote = TrackingSettings(uri="http://127.0.0.1:5000")
    assert tracking_uri(remote, tmp_path) == "http://127.0.0.1:5000"


def test_stages_of_one_pipeline_run_nest_under_one_parent(
    settings: TrackingSettings, home: Path
) -> None:
    uri_before = mlflow.get_tracking_uri()
    ingest = _stage(settings, home, "ingest")
    finetune = _stage(settings, home, "finetune")
    other = _stage(settings, home, "ingest", pipeline_run_id="p-2")

    client = _client(home)
    [parent] = _pipeline_runs(client, settings.experiment, "p-1")
    [other_parent] = _pipeline_runs(client, settings.experiment, "p-2")
    assert parent.info.run_name == "pipeline p-1"
    assert parent.info.status == "FINISHED"
    for run, expected_parent in [(ingest, parent), (finetune, parent), (other, other_parent)]:
        child = client.get_run(run.run_id)
        assert child.data.tags["mlflow.parentRunId"] == expected_parent.info.run_id
        assert child.info.status == "FINISHED"
    assert client.get_run(finetune.run_id).info.run_name == "finetune"
    # No process-wide mlflow state was touched.
    assert mlflow.get_tracking_uri() == uri_before
    assert mlflow.active_run() is None


def test_config_and_params_are_flattened_to_dotted_keys(
    settings: TrackingSettings, home: Path
) -> None:
    with stage_run(
        settings, home, "finetune", pipeline_run_id="p-1", config=FinetuneSettings()
    ) as run:
        run.log_params({"model": ModelSettings(), "a": {"b": {"c": 1}}, "long": "x" * 7000})
        run.log_params({f"k{i}": i for i in range(250)})  # more than one batch of 100

    params = _client(home).get_run(run.run_id).data.params
    assert params["lr"] == "0.0003"
    assert params["class_sampling"] == "[0.35, 0.25, 0.2, 0.2]"
    assert params["reconstruction_input"] == "masked"
    assert params["schedule"] == "cosine"
    assert params["model.encoder"] == "resnet34"
    assert params["model.classes"] == "['MA', 'HE', 'EX', 'SE']"
    assert params["model.reconstruction_weight"] == "0.1"
    assert params["a.b.c"] == "1"
    assert params["long"] == "x" * 5997 + "..."  # MLflow keeps at most 6000 characters
    assert [params[f"k{i}"] for i in (0, 99, 100, 249)] == ["0", "99", "100", "249"]
    assert "model" not in params and "a" not in params


def test_metrics_per_step_skip_nan_and_none(settings: TrackingSettings, home: Path) -> None:
    with stage_run(settings, home, "finetune", pipeline_run_id="p-1") as run:
        log = run.metric_logger()
        log({"loss": 1.5, "dice": math.nan}, 0)
        log({"loss": 0.25}, 1)
        run.log_metrics({"val_dice": 0.5, "iou": None}, step=1)
        run.log_metrics({f"m{i}": float(i) for i in range(1001)})  # more than one batch

    client = _client(home)
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "val_dice")] == [
        (1, 0.5)
    ]
    metrics = client.get_run(run.run_id).data.metrics
    assert "dice" not in metrics and "iou" not in metrics
    assert metrics["m1000"] == 1000.0
    assert len(metrics) == 1001 + 2


def test_artifacts_file_and_directory_land_in_the_workspace(
    settings: TrackingSettings, home: Path, tmp_path: Path
) -> None:
    made = tmp_path / "made"
    (made / "overlays" / "sub").mkdir(parents=True)
    (made / "curve.png").write_bytes(b"\x89PNG curve")
    (made / "overlays" / "IDRiD_01.png").write_bytes(b"overlay 1")
    (made / "overlays" / "sub" / "IDRiD_02.png").write_bytes(b"overlay 2")

    with stage_run(settings, home, "evaluate", pipeline_run_id="p-1") as run:
        run.log_artifact(made / "curve.png", "plots")
        run.log_artifact(made / "overlays")
        with pytest.raises(FileNotFoundError, match=r"missing\.png"):
            run.log_artifact(made / "missing.png")

    client = _client(home)
    artifact_uri = client.get_run(run.run_id).info.artifact_uri
    assert artifact_uri == f"{(home / 'mlartifacts').resolve().as_uri()}/{run.run_id}/artifacts"
    fetched = Path(client.download_artifacts(run.run_id, "", str(tmp_path / "fetched")))
    assert (fetched / "plots" / "curve.png").read_bytes() == b"\x89PNG curve"
    assert (fetched / "overlays" / "IDRiD_01.png").read_bytes() == b"overlay 1"
    assert (fetched / "overlays" / "sub" / "IDRiD_02.png").read_bytes() == b"overlay 2"


def test_lineage_tags(settings: TrackingSettings, home: Path) -> None:
    run = _stage(settings, home, "clahe", pipeline_run_id="p-9", dataset_hash="sha256:abc")
    with stage_run(settings, home, "ingest", pipeline_run_id="p-9") as extra:
        extra.set_tags({"drseg.gate": "passed"})

    client = _client(home)
    tags = client.get_run(run.run_id).data.tags
    assert tags["drseg.dataset_hash"] == "sha256:abc"
    assert tags["drseg.pipeline_run_id"] == "p-9"
    assert tags["drseg.stage"] == "clahe"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["drseg.git_commit"])  # tests run in a checkout
    assert tags["mlflow.source.git.commit"] == tags["drseg.git_commit"]
    extra_tags = client.get_run(extra.run_id).data.tags
    assert extra_tags["drseg.gate"] == "passed"
    assert "drseg.dataset_hash" not in extra_tags


def test_git_commit_outside_a_checkout_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"
    assert git_commit(tmp_path / "missing") == "unknown"


def test_a_raising_stage_ends_failed_and_the_pipeline_stays_failed(
    settings: TrackingSettings, home: Path
) -> None:
    with (
        pytest.raises(RuntimeError, match="out of memory"),
        stage_run(settings, home, "finetune", pipeline_run_id="p-1") as failed,
    ):
        raise RuntimeError("out of memory")
    later = _stage(settings, home, "evaluate")

    client = _client(home)
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(later.run_id).info.status == "FINISHED"
    [parent] = _pipeline_runs(client, settings.experiment, "p-1")
    assert parent.info.status == "FAILED"


def _check_null_run(run: StageRun | NullRun, tmp_path: Path) -> None:
    assert isinstance(run, NullRun)
    assert run.run_id == ""
    run.log_params(FinetuneSettings())
    run.metric_logger()({"loss": 1.0}, 0)
    run.log_artifact(tmp_path / "missing.png")
    run.set_tags({"a": "b"})


def test_disabled_tracking_records_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracking._say_tracking_off.cache_clear()  # said once per process; this test wants it said
    off = TrackingSettings(enabled=False)
    with stage_run(off, tmp_path, "ingest", pipeline_run_id="p-1", config={"a": 1}) as run:
        _check_null_run(run, tmp_path)

    assert list(tmp_path.iterdir()) == [], "no database, no artifacts folder"
    assert "tracking is off (tracking.enabled is false)" in capsys.readouterr().err


def test_without_mlflow_installed_tracking_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tracking._say_tracking_off.cache_clear()
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with stage_run(TrackingSettings(), tmp_path, "finetune", pipeline_run_id="p-1") as run:
        _check_null_run(run, tmp_path)

    assert list(tmp_path.iterdir()) == []
    assert "mlflow cannot be imported" in capsys.readouterr().err


def test_quoted_pipeline_run_id_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match='pipeline_run_id "a\'b"'),
        stage_run(TrackingSettings(), tmp_path, "ingest", pipeline_run_id="a'b"),
    ):
        pass


def test_unreachable_server_names_the_uri_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = TrackingSettings(uri=f"http://127.0.0.1:{port}")
    with (
        pytest.raises(tracking.TrackingError, match=rf"127\.0\.0\.1:{port}.*tracking\.enabled"),
        stage_run(down, tmp_path, "ingest", pipeline_run_id="p-1"),
    ):
        pass


# --- the pipeline's exit handler: closing the runs of a failed or cancelled pipeline ------


def _left_open(settings: TrackingSettings, home: Path, stage: str, pipeline_run_id: str) -> str:
    """A stage run whose process died mid-stage (a lost pod): started as stage_run starts
    it, never ended."""
    artifacts = (home / "mlartifacts").resolve().as_uri()
    _, run_id = tracking._start(
        _client(home), settings.experiment, artifacts, stage, pipeline_run_id, None
    )
    return run_id


def test_a_failed_pipeline_ends_its_open_runs_failed_and_names_the_step(
    settings: TrackingSettings, home: Path
) -> None:
    ingest = _stage(settings, home, "ingest", pipeline_run_id="p-f")
    finetune = _left_open(settings, home, "finetune", "p-f")
    client = _client(home)
    assert client.get_run(finetune).info.status == "RUNNING"

    ended = tracking.close_pipeline_runs(
        settings, home, "p-f", "FAILED", "Task exit-handler-1 failed: pod lost"
    )

    [parent] = _pipeline_runs(client, settings.experiment, "p-f")
    assert ended == [finetune, parent.info.run_id]
    assert client.get_run(finetune).info.status == "FAILED"
    assert client.get_run(ingest.run_id).info.status == "FINISHED"  # it did finish
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tracking.TAG_FAILED_STEP] == "finetune"
    assert parent.data.tags[tracking.TAG_PIPELINE_STATE] == "FAILED"
    assert parent.data.tags[tracking.TAG_PIPELINE_ERROR] == "Task exit-handler-1 failed: pod lost"


def test_a_stage_that_raised_is_named_as_the_failed_step(
    settings: TrackingSettings, home: Path
) -> None:
    with pytest.raises(RuntimeError), stage_run(settings, home, "gate", pipeline_run_id="p-g"):
        raise RuntimeError("metrics.json unreadable")
    _stage(settings, home, "evaluate", pipeline_run_id="p-g")

    tracking.close_pipeline_runs(settings, home, "p-g", "FAILED")

    [parent] = _pipeline_runs(_client(home), settings.experiment, "p-g")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tracking.TAG_FAILED_STEP] == "gate"
    assert tracking.TAG_PIPELINE_ERROR not in parent.data.tags


def test_a_cancelled_pipeline_ends_its_open_runs_killed(
    settings: TrackingSettings, home: Path
) -> None:
    finetune = _left_open(settings, home, "finetune", "p-c")

    tracking.close_pipeline_runs(settings, home, "p-c", "CANCELLED")

    client = _client(home)
    [parent] = _pipeline_runs(client, settings.experiment, "p-c")
    assert client.get_run(finetune).info.status == "KILLED"
    assert parent.info.status == "KILLED"
    assert parent.data.tags[tracking.TAG_PIPELINE_STATE] == "CANCELLED"


def test_a_pipeline_that_failed_before_any_stage_run_is_recorded(
    settings: TrackingSettings, home: Path
) -> None:
    """ingest failed: no stage had opened a run, so the exit handler makes the pipeline's."""
    [parent_id] = tracking.close_pipeline_runs(
        settings, home, "p-i", "FAILED", "Task ingest failed."
    )

    [parent] = _pipeline_runs(_client(home), settings.experiment, "p-i")
    assert parent.info.run_id == parent_id
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tracking.TAG_FAILED_STEP] == tracking.NO_STAGE_RUN


def test_a_succeeded_pipeline_is_left_as_it_is(settings: TrackingSettings, home: Path) -> None:
    finetune = _stage(settings, home, "finetune", pipeline_run_id="p-s")

    assert tracking.close_pipeline_runs(settings, home, "p-s", "SUCCEEDED") == []

    client = _client(home)
    [parent] = _pipeline_runs(client, settings.experiment, "p-s")
    assert parent.info.status == "FINISHED"
    assert client.get_run(finetune.run_id).info.status == "FINISHED"
    assert tracking.TAG_FAILED_STEP not in parent.data.tags
