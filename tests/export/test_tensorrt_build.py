"""Everything up to the TensorRT builder call: profile, metadata, and the decision to fall
back to ONNX. The builder call itself cannot run here: TensorRT is not installable on these
machines (the registry's packages are stubs) and there is no GPU; it runs in the TensorRT
image on a GPU node. STACK.md, "TensorRT"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from drseg.config import ExportSettings
from drseg.export.tensorrt_build import (
    OptimizationProfile,
    build_engine,
    engine_metadata,
    engine_unavailable_reason,
    optimization_profile,
    unavailable_reason,
)

NO_ENGINE_HERE = importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available()


def test_profile_comes_from_the_settings() -> None:
    profile = optimization_profile(
        ExportSettings(
            trt_min_shape=(1, 256, 256), trt_opt_shape=(2, 704, 1024), trt_max_shape=(8, 1024, 1024)
        )
    )
    assert profile == OptimizationProfile(
        "image", (1, 3, 256, 256), (2, 3, 704, 1024), (8, 3, 1024, 1024)
    )


def test_default_profile_fits_a_1024_wide_idrid_photograph() -> None:
    """1024 x 680 pads to 1024 x 704: inside min..max, and the opt shape itself."""
    profile = optimization_profile(ExportSettings())
    assert profile.min <= (1, 3, 704, 1024) <= profile.max
    assert profile.opt == (1, 3, 704, 1024)


@pytest.mark.parametrize(
    ("field", "shape", "message"),
    [
        ("trt_opt_shape", (1, 700, 1024), r"multiples of 32; use \(1, 704, 1024\)"),
        ("trt_min_shape", (0, 256, 256), r"batch must be >= 1"),
        ("trt_max_shape", (4, 512, 512), r"min <= opt <= max"),
    ],
)
def test_settings_refuse_bad_shapes(field: str, shape: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExportSettings.model_validate({field: shape})


def test_profile_refuses_bad_shapes_itself() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        OptimizationProfile("image", (1, 1, 64, 64), (1, 1, 64, 64), (1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"min <= opt <= max"):
        OptimizationProfile("image", (1, 3, 128, 128), (1, 3, 64, 64), (1, 3, 256, 256))


def test_metadata_records_version_gpu_profile_and_source() -> None:
    meta = engine_metadata(
        optimization_profile(ExportSettings()), True, "10.7.0", "NVIDIA H100", "9.0", "ab" * 32
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
