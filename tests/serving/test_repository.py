"""The Triton model repository writer: layout, and a config.pbtxt that Triton's own protobuf
parses and whose inputs and outputs match the exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2

from drseg.config import ExportSettings, ServeSettings
from drseg.contract import read_contract
from drseg.export.onnx_export import export_onnx
from drseg.serving.repository import (
    TensorSignature,
    graph_signature,
    read_config,
    version_onnx,
    versions,
    write_repository,
)
from tests.export import CLAHE, INGEST, THRESHOLDS, write_tiny_model


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("repository")
    write_tiny_model(work / "model")
    result = export_onnx(
        work / "model",
        THRESHOLDS,
        work / "model.onnx",
        ExportSettings(),
        INGEST,
        CLAHE,
    )
    return result.path


def _graph_io(path: Path) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(name, dims without batch, dynamic as -1) straight from the ONNX graph."""
    graph = onnx.load(str(path)).graph

    def dims(value: onnx.ValueInfoProto) -> list[int]:
        return [d.dim_value or -1 for d in value.type.tensor_type.shape.dim][1:]

    return [(v.name, dims(v)) for v in graph.input], [(v.name, dims(v)) for v in graph.output]


def test_onnx_repository_layout_and_config(onnx_file: Path, tmp_path: Path) -> None:
    settings = ServeSettings(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=500)
    version_dir = write_repository(tmp_path / "repo", onnx_file, 3, settings)
    assert version_dir == tmp_path / "repo" / "drseg" / "3"
    assert sorted(p.name for p in (tmp_path / "repo" / "drseg").iterdir()) == ["3", "config.pbtxt"]
    served = read_contract(version_dir / "model.onnx")
    assert read_contract(onnx_file).model_version is None, "exported before registration"
    assert served == read_contract(onnx_file).model_copy(update={"model_version": 3})
    assert _graph_io(version_dir / "model.onnx") == _graph_io(onnx_file)

    text = (tmp_path / "repo" / "drseg" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == (
        "drseg",
        "onnxruntime_onnx",
        8,
    )
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]
    inputs, outputs = _graph_io(onnx_file)
    assert [(i.name, list(i.dims)) for i in config.input] == inputs == [("image", [3, -1, -1])]
    assert [(o.name, list(o.dims)) for o in config.output] == outputs
    assert outputs == [("probabilities", [4, -1, -1])]
    assert {t.data_type for t in [*config.input, *config.output]} == {model_config_pb2.TYPE_FP32}
    assert read_config(tmp_path / "repo" / "drseg" / "config.pbtxt") == config


def test_graph_signature_drops_the_batch_dimension(onnx_file: Path) -> None:
    assert graph_signature(onnx_file) == (
        (TensorSignature("image", "TYPE_FP32", (3, -1, -1)),),
        (TensorSignature("probabilities", "TYPE_FP32", (4, -1, -1)),),
    )


def test_plan_repository_keeps_the_contract_beside_the_plan_on_gpu_instances(
    onnx_file: Path, tmp_path: Path
) -> None:
    """The plan file here is a placeholder: the writer only copies it (no TensorRT here).
    instance_kind stays at its default, cpu: Triton's TensorRT backend loads no plan on CPU
    instances, so a plan is served on KIND_GPU whatever the setting."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"placeholder, not a real engine")
    settings = ServeSettings(model_name="drseg-trt", instance_count=2)
    version_dir = write_repository(tmp_path / "repo", onnx_file, 5, settings, plan_path=plan)
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx", "model.plan"]
    assert read_contract(version_dir / "model.onnx").model_version == 5
    assert version_onnx(tmp_path / "repo", "drseg-trt", None) == (5, version_dir / "model.onnx")
    config = read_config(tmp_path / "repo" / "drseg-trt" / "config.pbtxt")
    assert (config.name, config.platform) == ("drseg-trt", "tensorrt_plan")
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)
    ]
    assert [i.name for i in config.input] == ["image"]


def test_versions_are_added_never_overwritten(onnx_file: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(repo, onnx_file, 2, ServeSettings())
    write_repository(repo, onnx_file, 10, ServeSettings())
    (repo / "drseg" / "notes").mkdir()
    assert versions(repo, "drseg") == [2, 10]
    assert versions(repo, "other") == []
    with pytest.raises(FileExistsError, match=r"drseg/10: version 10 already exists"):
        write_repository(repo, onnx_file, 10, ServeSettings())
    with pytest.raises(ValueError, match=r"version 0: Triton ignores version folders below 1"):
        write_repository(repo, onnx_file, 0, ServeSettings())
    assert not [p for p in (repo / "drseg").iterdir() if p.name.startswith(".")]


def test_an_export_for_another_version_is_refused(onnx_file: Path, tmp_path: Path) -> None:
    write_repository(tmp_path / "first", onnx_file, 3, ServeSettings())
    stamped = tmp_path / "first" / "drseg" / "3" / "model.onnx"
    write_repository(tmp_path / "again", stamped, 3, ServeSettings())
    with pytest.raises(ValueError, match=r"model\.onnx: exported for registry version 3, not 4"):
        write_repository(tmp_path / "other", stamped, 4, ServeSettings())
    assert not (tmp_path / "other" / "drseg" / "4").exists()


def test_missing_files_are_named(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.onnx: ONNX file not found"):
        write_repository(tmp_path, tmp_path / "nothing.onnx", 1, ServeSettings())
    with pytest.raises(FileNotFoundError, match=r"model\.plan: TensorRT plan not found"):
        write_repository(tmp_path, onnx_file, 1, ServeSettings(), tmp_path / "model.plan")
    with pytest.raises(FileNotFoundError, match=r"config\.pbtxt: no Triton model config"):
        read_config(tmp_path / "config.pbtxt")
    (tmp_path / "config.pbtxt").write_text("name: ")
    with pytest.raises(ValueError, match=r"config\.pbtxt: not a valid Triton model config"):
        read_config(tmp_path / "config.pbtxt")


def test_serve_settings_are_checked() -> None:
    with pytest.raises(
        ValidationError, match=r"preferred_batch_sizes \[8\] must lie in 1\.\.max_batch_size \(4\)"
    ):
        ServeSettings(preferred_batch_sizes=(2, 8))
    with pytest.raises(ValidationError, match=r"metrics_port must differ"):
        ServeSettings(http_port=9000, grpc_port=9000)
    with pytest.raises(ValidationError, match="model_name"):
        ServeSettings(model_name="has space")
