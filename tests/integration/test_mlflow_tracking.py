"""Stage runs against a real `mlflow server`, whose artifacts land in a real S3 server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from drseg.config import FinetuneSettings, TrackingSettings
from drseg.tracking import StageRun, stage_run
from tests.integration.mlflow_server import ARTIFACTS_PREFIX, MlflowServer
from tests.integration.s3_server import S3Server

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> TrackingSettings:
    """A fresh experiment on the server; this process gets no S3 access of its own, so every
    artifact has to go through the server's proxy."""
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    return TrackingSettings(uri=mlflow_server.uri, experiment=f"drseg-{uuid.uuid4().hex[:8]}")


def test_stage_runs_nest_and_record_on_the_server(
    settings: TrackingSettings,
    mlflow_server: MlflowServer,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    (tmp_path / "overlays").mkdir()
    (tmp_path / "curve.png").write_bytes(b"\x89PNG curve")
    (tmp_path / "overlays" / "IDRiD_01.png").write_bytes(b"overlay 1")
    home = tmp_path / "home"

    with stage_run(
        settings, home, "finetune", pipeline_run_id="p-1", dataset_hash="sha256:abc",
        config=FinetuneSettings(),
    ) as finetune:  # fmt: skip
        assert isinstance(finetune, StageRun)
        log = finetune.metric_logger()
        log({"loss": 1.5}, 0)
        log({"loss": 0.25}, 1)
    with stage_run(settings, home, "evaluate", pipeline_run_id="p-1") as evaluate:
        evaluate.log_artifact(tmp_path / "curve.png", "plots")
        evaluate.log_artifact(tmp_path / "overlays")

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    assert experiment is not None
    [parent] = client.search_runs([experiment.experiment_id], "tags.`drseg.kind` = 'pipeline'")
    assert parent.info.run_name == "pipeline p-1"
    assert parent.info.status == "FINISHED"
    for run in (finetune, evaluate):
        assert client.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id

    recorded = client.get_run(finetune.run_id)
    assert recorded.info.status == "FINISHED"
    assert recorded.data.params["lr"] == "0.0003"
    assert recorded.data.params["class_sampling"] == "[0.35, 0.25, 0.2, 0.2]"
    assert recorded.data.tags["drseg.dataset_hash"] == "sha256:abc"
    history = client.get_metric_history(finetune.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 0.25)]

    # The server chose where artifacts go; nothing was written to the local workspace.
    assert client.get_run(evaluate.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    assert not home.exists()
    fetched = Path(client.download_artifacts(evaluate.run_id, "", str(tmp_path / "fetched")))
    assert (fetched / "plots" / "curve.png").read_bytes() == b"\x89PNG curve"
    assert (fetched / "overlays" / "IDRiD_01.png").read_bytes() == b"overlay 1"

    # ... and they really are objects in the S3 bucket, read back without MLflow.
    s3 = s3_server.client()
    prefix = f"{ARTIFACTS_PREFIX}/{experiment.experiment_id}/{evaluate.run_id}/artifacts/"
    listed = s3.list_objects_v2(Bucket=mlflow_server.bucket, Prefix=prefix)
    keys = sorted(obj["Key"][len(prefix) :] for obj in listed.get("Contents", []))
    assert keys == ["overlays/IDRiD_01.png", "plots/curve.png"]
    body = s3.get_object(Bucket=mlflow_server.bucket, Key=f"{prefix}plots/curve.png")["Body"]
    assert body.read() == b"\x89PNG curve"


def test_a_raising_stage_ends_failed_on_the_server(
    settings: TrackingSettings, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    with (
        pytest.raises(RuntimeError, match="out of memory"),
        stage_run(settings, tmp_path, "finetune", pipeline_run_id="p-2") as failed,
    ):
        raise RuntimeError("out of memory")

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED"
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
