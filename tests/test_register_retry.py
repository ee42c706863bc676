"""The register step retried by KFP (registry writes are retried) registers once per
pipeline run, on a real MLflow (SQLite file)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlflow import MlflowClient

from drseg.artifacts import MODEL_CARD, ONNX_FILE, WEIGHTS_FILE, ModelCard
from drseg.config import FinetuneSettings, ModelSettings, RegistrySettings, TrackingSettings
from drseg.evaluate.schema import METRICS_FILE
from drseg.gate import evaluate_gate
from drseg.registry import alias_history
from drseg.steps import register_step
from drseg.tracking import tracking_uri
from tests.test_registry import DATASET, GATE, one_class_metrics, write_model_files


def test_a_retried_register_step_returns_the_version_its_run_made(tmp_path: Path) -> None:
    onnx_path, weights = write_model_files(tmp_path)
    served, model, evaluation = tmp_path / "served", tmp_path / "model", tmp_path / "evaluation"
    for folder in (served, model, evaluation):
        folder.mkdir()
    shutil.copyfile(onnx_path, served / ONNX_FILE)
    shutil.copyfile(weights, model / WEIGHTS_FILE)
    card = ModelCard(ModelSettings(), FinetuneSettings(), DATASET, 2)
    (model / MODEL_CARD).write_text(card.to_json())
    metrics = one_class_metrics()
    metrics.write(evaluation / METRICS_FILE)
    verdict = evaluate_gate(metrics, GATE, None).model_dump_json()
    registry, tracking, home = RegistrySettings(model_name="retried"), TrackingSettings(), tmp_path

    def register(pipeline_run_id: str) -> str:
        figures = register_step(
            served, model, evaluation, verdict, registry, tracking, home, pipeline_run_id
        )
        return str(figures["version"])

    assert register("p-1") == "1"
    assert register("p-1") == "1"  # the retry: no second version
    assert register("p-2") == "2"  # another pipeline run: a version of its own
    client = MlflowClient(tracking_uri=tracking_uri(tracking, home))
    assert sorted(v.version for v in client.search_model_versions("name = 'retried'")) == [1, 2]
    # A retry after @challenger had moved on (as after a failure between the version and
    # the alias) points it back at the run's version, recorded like any move.
    assert register("p-1") == "1"
    moves = [(m.action, m.alias, m.from_version, m.to_version) for m in alias_history(
        tracking_uri(tracking, home), "retried")]  # fmt: skip
    assert moves == [
        ("register", "challenger", None, "1"),
        ("register", "challenger", "1", "2"),
        ("register", "challenger", "2", "1"),
    ]
