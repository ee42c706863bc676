"""The pipeline's publish step: the KFP component's own function on a repository artifact,
writing where the Rollout reads (a local folder standing in for the object store)."""

from __future__ import annotations

from pathlib import Path

from components.publish import publish
from kfp import dsl

from drseg.config import RolloutSettings, ServeSettings
from drseg.deploy.publish import MARKER
from drseg.serving.repository import write_repository
from tests.export import INGEST
from tests.serving import export_tiny


def test_component_publishes_the_repository_artifact(tmp_path: Path) -> None:
    onnx_path = export_tiny(tmp_path / "export", INGEST, version=None)
    served = write_repository(tmp_path / "repo", onnx_path, 4, ServeSettings()) / "model.onnx"
    settings = RolloutSettings(repository_uri=str(tmp_path / "store" / "{version}"))
    uri = publish.python_func(
        repository=dsl.Artifact(uri=str(tmp_path / "repo")),
        version=4,
        serve_config=ServeSettings().model_dump_json(),
        config=settings.model_dump_json(),
    )
    assert uri == str(tmp_path / "store" / "4")
    assert (tmp_path / "store" / "4" / MARKER).is_file()
    assert (tmp_path / "store" / "4" / "drseg" / "4" / "model.onnx").read_bytes() == (
        served.read_bytes()
    )
