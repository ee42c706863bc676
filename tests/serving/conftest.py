"""A real Triton (pytriton's bundled tritonserver) on 127.0.0.1 serving the tiny exported
model, one per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from drseg.data.synthetic import write_synthetic_dataset
from drseg.serving.server import running_server
from tests.export import INGEST
from tests.serving import MAX_INPUT_PIXELS, Served, export_tiny, serve_settings, to_repository


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with the test working width (192)."""
    return export_tiny(tmp_path_factory.mktemp("exported"), INGEST)


@pytest.fixture(scope="module")
def served(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("served")
    write_synthetic_dataset(work / "source", n=2, seed=5, width=256)
    onnx_path = to_repository(exported, work / "repo")
    settings = serve_settings(max_input_pixels=MAX_INPUT_PIXELS)
    with running_server(work / "repo", settings, log_file=work / "triton.log") as server:
        yield Served(server, onnx_path, sorted((work / "source" / "images").iterdir()))
