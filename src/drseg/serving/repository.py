"""A standard Triton model repository for the exported model.

Layout: ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/model.onnx`` (ONNX
Runtime backend), or ``.../<version>/model.plan`` beside that model.onnx (TensorRT backend,
always on KIND_GPU instances: Triton's TensorRT backend loads no plan on CPU instances). The
version is the registry version, and it is written into the serving contract of the
model.onnx in the version folder, so a client that reads the contract knows which version
to ask Triton for (a plan's contract is the ONNX file kept beside it; Triton loads only
model.plan there). Inputs and outputs of config.pbtxt are read off the exported ONNX graph
(batch dimension dropped, dynamic sides as -1), so they cannot drift from it. The config is
written with Triton's own protobuf (tritonclient's model_config_pb2), so it parses.

A version folder is built under a temporary name and renamed into place, and an existing
version is never overwritten (registry versions are not reused); config.pbtxt is replaced
atomically after the version is complete, so a polling Triton never sees half a model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from drseg import atomic
from drseg.artifacts import ONNX_FILE
from drseg.config import ServeSettings
from drseg.contract import CONTRACT_KEY, read_contract

CONFIG_FILE = "config.pbtxt"
PLAN_FILE = "model.plan"
ONNX_PLATFORM = "onnxruntime_onnx"
PLAN_PLATFORM = "tensorrt_plan"

_TRITON_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
}


@dataclass(frozen=True)
class TensorSignature:
    name: str
    data_type: str
    """Triton type name, e.g. "TYPE_FP32"."""
    dims: tuple[int, ...]
    """Without the batch dimension; -1 where the graph's size is dynamic."""


def graph_signature(
    onnx_path: Path,
) -> tuple[tuple[TensorSignature, ...], tuple[TensorSignature, ...]]:
    """(inputs, outputs) of an ONNX graph as Triton sees them with batching on: the first
    dimension must be the dynamic batch."""
    proto = onnx.load(str(onnx_path), load_external_data=False)

    def signature(value: onnx.ValueInfoProto) -> TensorSignature:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ValueError(
                f"{onnx_path}: {value.name!r} has ONNX element type {tensor.elem_type}, not "
                f"float32/float16; re-export with drseg.export.onnx_export"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not dims or dims[0] != -1:
            raise ValueError(
                f"{onnx_path}: {value.name!r} has shape {dims}, without a dynamic batch "
                f"dimension first; export with a dynamic batch axis (export_onnx does)"
            )
        return TensorSignature(value.name, _TRITON_TYPES[tensor.elem_type], tuple(dims[1:]))

    initializers = {init.name for init in proto.graph.initializer}
    inputs = tuple(signature(v) for v in proto.graph.input if v.name not in initializers)
    return inputs, tuple(signature(v) for v in proto.graph.output)


def model_config(
    name: str,
    platform: str,
    inputs: tuple[TensorSignature, ...],
    outputs: tuple[TensorSignature, ...],
    settings: ServeSettings,
) -> Any:
    """The model_config_pb2.ModelConfig of the served model."""
    config = model_config_pb2.ModelConfig(
        name=name, platform=platform, max_batch_size=settings.max_batch_size
    )
    for tensors, field in ((inputs, config.input), (outputs, config.output)):
        for tensor in tensors:
            entry = field.add()
            entry.name = tensor.name
            entry.data_type = model_config_pb2.DataType.Value(tensor.data_type)
            entry.dims.extend(tensor.dims)
    config.dynamic_batching.preferred_batch_size.extend(settings.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    group = config.instance_group.add()
    group.count = settings.instance_count
    kind = "gpu" if platform == PLAN_PLATFORM else settings.instance_kind
    group.kind = model_config_pb2.ModelInstanceGroup.Kind.Value(f"KIND_{kind.upper()}")
    return config


def read_config(config_path: Path) -> Any:
    """Parse a config.pbtxt into a model_config_pb2.ModelConfig."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: no Triton model config; write the repository with "
            f"drseg.serving.repository.write_repository"
        )
    try:
        return text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(
            f"{config_path}: not a valid Triton model config ({exc}); write it again with "
            f"write_repository"
        ) from exc


def versions(repository: Path, model_name: str) -> list[int]:
    """The version folders of a model, ascending (Triton ignores non-numeric names)."""
    folder = Path(repository) / model_name
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name)
    )


def version_onnx(repository: Path, model_name: str, version: int | None) -> tuple[int, Path]:
    """(version, its model.onnx) in the repository; version None: the newest. The ONNX file
    holds the version's serving contract, also where Triton serves a plan."""
    folder = Path(repository) / model_name
    available = versions(repository, model_name)
    if not available:
        raise FileNotFoundError(f"{folder}: no version folders; add one with write_repository")
    chosen = available[-1] if version is None else version
    if chosen not in available:
        raise FileNotFoundError(
            f"{folder}: no version {chosen} (versions: {available}); pass one of those or "
            f"none for the latest"
        )
    onnx_path = folder / str(chosen) / ONNX_FILE
    if not onnx_path.is_file():
        raise FileNotFoundError(
            f"{onnx_path}: missing, so version {chosen}'s serving contract is unknown; write "
            f"the version again with this drseg (it keeps the ONNX file beside a plan)"
        )
    return chosen, onnx_path


def write_versioned_onnx(onnx_path: Path, version: int, out: Path) -> None:
    """Copy `onnx_path` to `out` with `version` in its serving contract; an export made for
    another registry version is refused (its thresholds would be served under a wrong name)."""
    contract = read_contract(onnx_path)
    if contract.model_version not in (None, version):
        raise ValueError(
            f"{onnx_path}: exported for registry version {contract.model_version}, not "
            f"{version}; write the repository with version {contract.model_version}, or "
            f"export the model again"
        )
    proto = onnx.load(str(onnx_path), load_external_data=False)
    entry = next(p for p in proto.metadata_props if p.key == CONTRACT_KEY)
    entry.value = contract.model_copy(update={"model_version": version}).to_json()
    atomic.write_bytes(out, proto.SerializeToString())


def write_repository(
    repository: Path,
    onnx_path: Path,
    version: int,
    settings: ServeSettings,
    plan_path: Path | None = None,
) -> Path:
    """Add `version` of settings.model_name to `repository`; returns the version folder.

    Serves `plan_path` (platform tensorrt_plan) when given, else `onnx_path` (platform
    onnxruntime_onnx); the ONNX file describes the inputs and outputs either way, and is
    kept in the version folder with `version` in its contract.
    """
    if version < 1:
        raise ValueError(
            f"version {version}: Triton ignores version folders below 1; use the registry "
            f"version (1, 2, ...)"
        )
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX file not found; run the export step first")
    if plan_path is not None and not Path(plan_path).is_file():
        raise FileNotFoundError(
            f"{plan_path}: TensorRT plan not found; build it with build_engine, or serve "
            f"ONNX by passing no plan"
        )
    inputs, outputs = graph_signature(onnx_path)
    platform = ONNX_PLATFORM if plan_path is None else PLAN_PLATFORM
    config = model_config(settings.model_name, platform, inputs, outputs, settings)
    model_dir = Path(repository) / settings.model_name
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise FileExistsError(
            f"{version_dir}: version {version} already exists in the repository; registry "
            f"versions are never reused, so register a new version (or remove this folder)"
        )
    with atomic.output_dir(version_dir) as work:
        write_versioned_onnx(onnx_path, version, work / ONNX_FILE)
        if plan_path is not None:
            shutil.copyfile(plan_path, work / PLAN_FILE)
    atomic.write_text(model_dir / CONFIG_FILE, text_format.MessageToString(config))
    return version_dir
