"""Helpers shared by the serving tests: free loopback ports, the tiny model exported and
written into a Triton repository, and ONNX Runtime called directly (the reference that
served outputs are compared with: pytriton's stub under the wrong numpy receives all-zero
inputs without any error, STACK.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from drseg.config import ExportSettings, IngestSettings, ServeSettings
from drseg.export.onnx_export import export_onnx
from drseg.serving.client import Protocol
from drseg.serving.repository import write_repository
from drseg.serving.server import RunningServer
from tests.export import CLAHE, THRESHOLDS, write_tiny_model
from tests.ports import free_ports

VERSION = 3
MAX_INPUT_PIXELS = 512 * 512
"""serve.max_input_pixels of the served fixture: above every good request of the tests, low
enough that a refused one stays small."""


def serve_settings(**fields: Any) -> ServeSettings:
    """ServeSettings on free ports, with `fields` changed."""
    http, grpc, metrics = free_ports(3)
    return ServeSettings(http_port=http, grpc_port=grpc, metrics_port=metrics, **fields)


def export_tiny(work: Path, ingest_settings: IngestSettings, version: int | None = VERSION) -> Path:
    """Tiny model -> <work>/model.onnx, for registry `version` (None: unversioned, as the
    pipeline exports before registering; the repository step writes the version in)."""
    write_tiny_model(work / "model")
    return export_onnx(
        work / "model",
        THRESHOLDS,
        work / "model.onnx",
        ExportSettings(),
        ingest_settings,
        CLAHE,
        model_version=version,
    ).path


def to_repository(onnx_path: Path, repository: Path) -> Path:
    """Version VERSION of model drseg in `repository`; returns the served model.onnx."""
    return write_repository(repository, onnx_path, VERSION, ServeSettings()) / "model.onnx"


@dataclass(frozen=True)
class Served:
    server: RunningServer
    onnx_path: Path
    photos: list[Path]


def url(server: RunningServer, protocol: Protocol) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def direct(onnx_path: Path, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"image": batch})[0], np.float32)
