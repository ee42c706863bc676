"""TensorRT engine (model.plan) from the exported ONNX file, where TensorRT and a GPU exist.

A plan is tied to the TensorRT version and the GPU architecture it was built on, so it is
built on a GPU node in the TensorRT image pinned to the Triton image's release, and the
JSON written beside it records both. Where TensorRT or a CUDA GPU is missing (this
machine, CI), `build_engine` builds nothing and says that ONNX is served, and why.

Dynamic shapes need one optimisation profile: min/opt/max (batch, 3, height, width) from
ExportSettings, sides multiples of 32. Written for the TensorRT 10 Python API; TensorRT 11
dropped the FP16 builder flag (strong typing only), which is reported, not ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from drseg import atomic
from drseg.config import ExportSettings, Shape, check_order, check_shape
from drseg.contract import INPUT_NAME

PLAN_FILE = "model.plan"
PLAN_METADATA_FILE = "model.plan.json"

ImageShape = tuple[int, int, int, int]
"""(batch, 3, height, width)."""


@dataclass(frozen=True)
class OptimizationProfile:
    """The shapes TensorRT tunes for (opt) and accepts (min..max) on the image input."""

    input_name: str
    min: ImageShape
    opt: ImageShape
    max: ImageShape

    def __post_init__(self) -> None:
        shapes: dict[str, Shape] = {}
        for name, (batch, channels, height, width) in (
            ("min", self.min),
            ("opt", self.opt),
            ("max", self.max),
        ):
            if channels != 3:
                raise ValueError(f"profile {name} shape {getattr(self, name)}: 3 channels expected")
            shapes[name] = check_shape(f"profile {name} shape", (batch, height, width))
        check_order(shapes["min"], shapes["opt"], shapes["max"])


def optimization_profile(settings: ExportSettings) -> OptimizationProfile:
    def image(shape: Shape) -> ImageShape:
        batch, height, width = shape
        return batch, 3, height, width

    return OptimizationProfile(
        INPUT_NAME,
        image(settings.trt_min_shape),
        image(settings.trt_opt_shape),
        image(settings.trt_max_shape),
    )


def unavailable_reason(tensorrt_version: str | None, gpu_name: str | None) -> str | None:
    """Why no engine can be built with what was found; None when it can."""
    missing = []
    if tensorrt_version is None:
        missing.append(
            "the tensorrt Python package is not importable (the registry's packages are "
            "stubs; build in the TensorRT NGC image pinned to the Triton release)"
        )
    if gpu_name is None:
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return "; ".join(missing) or None


def _tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def _gpu() -> tuple[str, str] | None:
    """(name, compute capability "major.minor") of GPU 0, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def engine_unavailable_reason() -> str | None:
    """Why this machine cannot build an engine (tensorrt importable AND a CUDA GPU)."""
    gpu = _gpu()
    return unavailable_reason(_tensorrt_version(), None if gpu is None else gpu[0])


def engine_metadata(
    profile: OptimizationProfile,
    fp16: bool,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    onnx_sha256: str,
) -> dict[str, Any]:
    """What the plan is bound to (TensorRT version, GPU) and what it was built from."""
    return {
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "fp16": fp16,
        "profile": {
            "input": profile.input_name,
            "min": list(profile.min),
            "opt": list(profile.opt),
            "max": list(profile.max),
        },
        "onnx_sha256": onnx_sha256,
    }


@dataclass(frozen=True)
class EngineResult:
    served_format: Literal["tensorrt_plan", "onnx"]
    reason: str
    plan: Path | None = None
    metadata: Path | None = None


def build_engine(onnx_path: Path, out_dir: Path, settings: ExportSettings) -> EngineResult:
    """Build <out_dir>/model.plan and <out_dir>/model.plan.json where possible; otherwise
    build nothing and return served format "onnx" with the reason."""
    profile = optimization_profile(settings)
    reason = engine_unavailable_reason()
    if reason is not None:
        return EngineResult("onnx", f"no TensorRT engine built: {reason}")
    return _build(Path(onnx_path), Path(out_dir), profile, settings)


def _build(
    onnx_path: Path, out_dir: Path, profile: OptimizationProfile, settings: ExportSettings
) -> EngineResult:
    """The TensorRT builder call; runs only where engine_unavailable_reason() is None."""
    import tensorrt as trt

    gpu = _gpu()
    if gpu is None:
        raise RuntimeError("no CUDA GPU visible; build_engine checks this before calling _build")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(
            f"{onnx_path}: TensorRT {trt.__version__} cannot parse the ONNX file ({errors}); "
            f"re-export with another export.opset or report the operator"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(settings.trt_workspace_gib * 2**30)
    )
    if settings.trt_fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise RuntimeError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing only); "
                f"set export.trt_fp16 to false, or convert {onnx_path} to FP16 first"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"{onnx_path}: TensorRT {trt.__version__} failed to build an engine on {gpu[0]} "
            f"(see its log above); try a smaller export.trt_max_shape or more workspace"
        )
    plan, metadata = out_dir / PLAN_FILE, out_dir / PLAN_METADATA_FILE
    atomic.write_bytes(plan, bytes(serialized))
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    meta = engine_metadata(profile, settings.trt_fp16, str(trt.__version__), *gpu, digest)
    atomic.write_text(metadata, json.dumps(meta, indent=2) + "\n")
    return EngineResult("tensorrt_plan", f"built with TensorRT {trt.__version__}", plan, metadata)
