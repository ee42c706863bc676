"""Register and promote against a real `mlflow server`, whose artifacts land in a real S3."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import onnxruntime
import pytest
from mlflow import MlflowClient

from drseg.config import TrackingSettings
from drseg.gate import evaluate_gate
from drseg.registry import (
    alias_history,
    champion_version,
    download,
    linked_model_id,
    promote,
    register_model,
)
from drseg.serving.client import prepare_photograph
from drseg.tracking import stage_run
from tests.integration.mlflow_server import ARTIFACTS_PREFIX, MlflowServer
from tests.integration.s3_server import S3Server
from tests.test_registry import (
    CONTRACT,
    GATE,
    one_class_metrics,
    relu_runs,
    write_model_files,
    write_segmenter,
)
from tests.test_registry import _register as register

pytestmark = pytest.mark.integration

DATASET = "sha256:" + "cd" * 32


def test_register_and_promote_on_the_server(
    mlflow_server: MlflowServer,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This process gets no S3 access of its own: every artifact goes through the server.
    for variable in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    uri = mlflow_server.uri
    settings = TrackingSettings(uri=uri, experiment=f"drseg-{uuid.uuid4().hex[:8]}")
    with stage_run(settings, tmp_path / "home", "register", pipeline_run_id="p-1") as run:
        run_id = run.run_id
    metrics = one_class_metrics(merged=0.82)
    verdict = evaluate_gate(metrics, GATE, None)
    name = f"seg-{uuid.uuid4().hex[:8]}"
    (tmp_path / "model").mkdir()
    files = write_model_files(tmp_path / "model")
    for _ in range(2):
        register_model(
            uri, name, *files, run_id=run_id, dataset_hash=DATASET, metrics=metrics,
            verdict=verdict, git_commit="abc", pipeline_run_id="p-1",
        )  # fmt: skip
    promote(uri, name, 1)
    promote(uri, name, 2, reason="canary healthy")

    client = MlflowClient(tracking_uri=uri)
    aliases = client.get_registered_model(name).aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {
        "champion": "2",
        "previous": "1",
    }
    moves = [(m.action, m.alias, m.from_version, m.to_version) for m in alias_history(uri, name)]
    assert moves[-3:] == [
        ("promote", "previous", None, "1"),
        ("promote", "champion", "1", "2"),
        ("promote", "challenger", "2", None),
    ]
    assert champion_version(uri, name) == "2"

    # Linked to its logged model as mlflow.register_model links one; the server chose where
    # the model went, and serves it back by alias.
    version = client.get_model_version(name, "2")
    model_id = linked_model_id(version)
    assert model_id is not None and version.source == f"models:/{model_id}"
    source = client.get_model_version_download_uri(name, "2")
    assert source == client.get_logged_model(model_id).artifact_location
    assert source.startswith("mlflow-artifacts:/")
    number, fetched = download(uri, name, "champion", tmp_path / "fetched")
    assert number == "2"
    assert relu_runs(fetched / "model.onnx")
    assert (fetched / "checkpoint" / "model.pt").read_bytes() == b"fake weights"

    # ... and the files really are objects in the S3 bucket, read back without MLflow.
    experiment = client.get_experiment_by_name(settings.experiment)
    assert experiment is not None
    prefix = f"{ARTIFACTS_PREFIX}/{experiment.experiment_id}/models/{model_id}/artifacts/"
    listed = s3_server.client().list_objects_v2(Bucket=mlflow_server.bucket, Prefix=prefix)
    keys = {obj["Key"][len(prefix) :] for obj in listed.get("Contents", [])}
    assert {"MLmodel", "model.onnx", "checkpoint/model.pt", "evaluation/metrics.json"} <= keys
    assert "serving_input_example.json" in keys


def test_champion_loads_with_pyfunc_from_the_server(
    mlflow_server: MlflowServer,
    s3_server: S3Server,
    synthetic_generic: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`mlflow.pyfunc.load_model("models:/drseg-lesions@champion")` against the server, which
    fetches the version's files from S3: predict on a photograph's prepared array."""
    for variable in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    uri = mlflow_server.uri
    settings = TrackingSettings(uri=uri, experiment=f"drseg-{uuid.uuid4().hex[:8]}")
    with stage_run(settings, tmp_path / "home", "register", pipeline_run_id="p-1") as run:
        run_id = run.run_id
    graph = write_segmenter(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"weights")
    number = register(uri, "drseg-lesions", run_id, (graph, tmp_path / "model.pt"))
    promote(uri, "drseg-lesions", number)
    photograph = sorted((synthetic_generic / "images").iterdir())[0]
    batch = prepare_photograph(photograph, CONTRACT).model_input[None]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/drseg-lesions@champion")
    predicted = model.predict(batch)["probabilities"]

    expected = onnxruntime.InferenceSession(str(graph)).run(None, {"image": batch})[0]
    np.testing.assert_allclose(predicted, expected, rtol=1e-6)
    assert model.metadata.get_input_schema().input_names() == ["image"]
