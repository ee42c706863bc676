"""Everything up to the TensorRT builder call: profile, metadata, and the decision to fall
back to ONNX. The builder call itself cannot run here: TensorRT is not installable on these
machines (the registry's packages are stubs) and there is no GPU; it runs in the TensorRT
image on a GPU node. STACK.md, "TensorRT"."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from drseg.config import ExportSettings, Settings, SettingsError, load_settings, trt_profile
from drseg.contract import read_contract
from drseg.data import dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.evaluate.served import ServedGraph, mask_agreement, onnx_runner
from drseg.export import tensorrt_build
from drseg.export.tensorrt_build import (
    EngineResult,
    OptimizationProfile,
    build_engine,
    engine_metadata,
    engine_unavailable_reason,
    optimization_profile,
    unavailable_reason,
)
from drseg.steps import engine_step
from tests.export import INGEST
from tests.serving import export_tiny

REPO = Path(__file__).resolve().parents[2]
NO_ENGINE_HERE = importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available()


def test_profile_is_derived_from_the_working_width_and_photo_shapes() -> None:
    """1024 x 680 (IDRiD's aspect) pads to 1024 x 704: the opt shape; max holds a square
    photograph at 4 per batch. At IDRiD's 2048 the same rule gives 2048 x 1376."""
    profile = optimization_profile(ExportSettings(), 1024)
    assert profile == OptimizationProfile(
        "image", (1, 3, 256, 256), (1, 3, 704, 1024), (4, 3, 1024, 1024)
    )
    wide = optimization_profile(ExportSettings(), 2048)
    assert (wide.opt, wide.max) == ((1, 3, 1376, 2048), (4, 3, 2048, 2048))
    small = optimization_profile(ExportSettings(), 128)  # the tests' working width
    assert (small.min, small.opt, small.max) == ((1, 3, 96, 128), (1, 3, 96, 128), (4, 3, 128, 128))


def test_shapes_given_in_the_settings_are_kept() -> None:
    settings = ExportSettings(trt_opt_shape=(2, 704, 1024), trt_max_shape=(8, 1024, 1024))
    assert trt_profile(settings, 1024) == ((1, 256, 256), (2, 704, 1024), (8, 1024, 1024))


def test_a_profile_too_small_for_the_working_size_is_refused_at_settings_load() -> None:
    """configs/idrid.yaml serves 2048 x 1376: a 1024 x 1024 engine would refuse it."""
    too_small = {"ingest": {"working_width": 2048}, "export": {"trt_max_shape": [4, 1024, 1024]}}
    with pytest.raises(ValidationError, match=r"cannot hold a photograph at working width 2048"):
        Settings.model_validate(too_small)
    with pytest.raises(SettingsError, match=r"give at least \(batch, 2048, 2048\)"):
        load_settings(
            environ={
                "DRSEG_INGEST__WORKING_WIDTH": "2048",
                "DRSEG_EXPORT__TRT_MAX_SHAPE": "[4, 1024, 2048]",
            }
        )
    idrid = load_settings(REPO / "configs" / "idrid.yaml", environ={})
    assert trt_profile(idrid.export, idrid.ingest.working_width)[2] == (4, 2048, 2048)


@pytest.mark.parametrize(
    ("field", "shape", "message"),
    [
        ("trt_opt_shape", (1, 700, 1024), r"multiples of 32; use \(1, 704, 1024\)"),
        ("trt_min_shape", (0, 256, 256), r"batch must be >= 1"),
    ],
)
def test_settings_refuse_bad_shapes(field: str, shape: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExportSettings.model_validate({field: shape})
    with pytest.raises(ValueError, match=r"min <= opt <= max"):
        trt_profile(ExportSettings(trt_min_shape=(1, 512, 512)), 512)


def test_profile_refuses_bad_shapes_itself() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        OptimizationProfile("image", (1, 1, 64, 64), (1, 1, 64, 64), (1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"min <= opt <= max"):
        OptimizationProfile("image", (1, 3, 128, 128), (1, 3, 64, 64), (1, 3, 256, 256))


def test_metadata_records_version_gpu_profile_and_source() -> None:
    meta = engine_metadata(
        optimization_profile(ExportSettings(), 1024),
        True,
        "10.7.0",
        "NVIDIA H100",
        "9.0",
        "ab" * 32,
    )
    assert meta == {
        "tensorrt_version": "10.7.0",
        "gpu_name": "NVIDIA H100",
        "compute_capability": "9.0",
        "fp16": True,
        "profile": {
            "input": "image",
            "min": [1, 3, 256, 256],
            "opt": [1, 3, 704, 1024],
            "max": [4, 3, 1024, 1024],
        },
        "onnx_sha256": "ab" * 32,
    }


def test_fallback_decision_needs_both_tensorrt_and_a_gpu() -> None:
    assert unavailable_reason("10.7.0", "NVIDIA H100") is None
    no_trt = unavailable_reason(None, "NVIDIA H100")
    no_gpu = unavailable_reason("10.7.0", None)
    neither = unavailable_reason(None, None)
    assert no_trt is not None and "tensorrt Python package is not importable" in no_trt
    assert no_gpu is not None and "no CUDA GPU" in no_gpu
    assert neither == f"{no_trt}; {no_gpu}"


@pytest.mark.skipif(not NO_ENGINE_HERE, reason="TensorRT and a GPU exist: the engine is built")
def test_build_engine_falls_back_to_onnx_here(tmp_path: Path) -> None:
    reason = engine_unavailable_reason()
    assert reason is not None
    result = build_engine(tmp_path / "model.onnx", tmp_path / "engine", ExportSettings())
    assert result.served_format == "onnx"
    assert result.reason == f"no TensorRT engine built: {reason}"
    assert (result.plan, result.metadata) == (None, None)
    assert not (tmp_path / "engine").exists()


@pytest.fixture(scope="module")
def graph_and_photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(export folder with the tiny model.onnx, ingest-stage dataset at its working width)."""
    work = tmp_path_factory.mktemp("plan-check")
    write_synthetic_dataset(work / "source", n=3, seed=4, width=256)
    ingest(work / "source", work / "ingested", INGEST)
    (work / "export").mkdir()
    export_tiny(work / "export", INGEST)
    return work / "export", work / "ingested"


def _fake_build(plan_bytes: bytes) -> Any:
    """build_engine as it returns on a GPU node: a plan file written, served format plan."""

    def build(onnx_path: Path, out_dir: Path, settings: ExportSettings) -> EngineResult:
        (out_dir / "model.plan").write_bytes(plan_bytes)
        (out_dir / "model.plan.json").write_text("{}")
        return EngineResult("tensorrt_plan", "built with TensorRT 10.7", out_dir / "model.plan")

    return build


def _runner_from(onnx_path: Path, change: Any) -> Any:
    """A stand-in for plan_runner: the graph in ONNX Runtime, its output passed to `change`
    (TensorRT cannot run here, STACK.md); what engine_step does with it is the real code."""
    run = onnx_runner(onnx_path, read_contract(onnx_path))
    return lambda plan: lambda batch: change(run(batch))


@pytest.mark.parametrize(
    ("change", "served"),
    [
        (lambda p: p, "tensorrt_plan"),  # the FP16 plan matching the graph
        (lambda p: np.clip(p + 0.1, 0, 1), "onnx"),  # drifted: lesions grow, refused
    ],
)
def test_a_built_plan_is_served_only_if_its_masks_agree_with_the_graph(
    graph_and_photos: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Any,
    served: str,
) -> None:
    export_dir, ingested = graph_and_photos
    onnx_path = export_dir / "model.onnx"
    monkeypatch.setattr(tensorrt_build, "build_engine", _fake_build(b"plan"))
    monkeypatch.setattr(tensorrt_build, "plan_runner", _runner_from(onnx_path, change))
    built = engine_step(export_dir, ingested, tmp_path / "engine", ExportSettings(), "train")
    assert built["served_format"] == served
    assert "validation photographs (mask Dice per class: MA" in built["reason"]
    if served == "onnx":
        assert built["reason"].startswith("TensorRT plan refused: it DISAGREES with the ONNX graph")
        assert not any((tmp_path / "engine").iterdir())  # nothing left to serve by mistake
    else:
        assert "the plan agrees with the ONNX graph on 2 validation photographs" in built["reason"]
        assert (tmp_path / "engine" / "model.plan").is_file()


def test_mask_agreement_is_per_class_and_the_lowest_decides(
    graph_and_photos: tuple[Path, Path],
) -> None:
    export_dir, ingested = graph_and_photos
    onnx_path = export_dir / "model.onnx"
    records = dataset.load_manifest(ingested).records
    photos = [dataset.image_path(ingested, r.id) for r in records]
    graph = ServedGraph(onnx_path)
    assert mask_agreement(graph, graph, photos, 1.0).dice == dict.fromkeys(graph.classes, 1.0)

    def no_ma(batch: np.ndarray) -> np.ndarray:
        out = graph._run(batch).copy()
        out[:, 0] = 0.0
        return out

    missing = mask_agreement(graph, ServedGraph(onnx_path, no_ma), photos, 0.98)
    assert missing.dice["MA"] == 0.0 and missing.dice["HE"] == 1.0
    assert not missing.passed
    with pytest.raises(ValueError, match="no photographs to compare"):
        mask_agreement(graph, graph, [], 0.98)
