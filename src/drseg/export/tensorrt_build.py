"""TensorRT engine (model.plan) from the exported ONNX file, where TensorRT and a GPU exist.

A plan is tied to the TensorRT version and the GPU architecture it was built on, so it is
built on a GPU node in the TensorRT image pinned to the Triton image's release, and the
JSON written beside it records both. Where TensorRT or a CUDA GPU is missing (this
machine, CI), `build_engine` builds nothing and says that ONNX is served, and why.

Dynamic shapes need one optimisation profile: min/opt/max (batch, 3, height, width),
derived from the graph's working width and the photographs' shapes (drseg.config's
trt_profile, also checked when the settings load), sides multiples of 32. A built plan is
checked against the graph before it may be served (drseg.steps.engine_step, which runs it
with plan_runner). Written for the TensorRT 10 Python API; TensorRT 11 dropped the FP16
builder flag (strong typing only), which is reported, not ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from drseg import atomic
from drseg.config import ExportSettings, Shape, check_order, check_shape, trt_profile
from drseg.contract import INPUT_NAME, OUTPUT_NAME, read_contract

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


def optimization_profile(settings: ExportSettings, working_width: int) -> OptimizationProfile:
    """The profile for photographs at `working_width` (the graph's contract), drseg.config's
    trt_profile as TensorRT takes it."""

    def image(shape: Shape) -> ImageShape:
        batch, height, width = shape
        return batch, 3, height, width

    low, opt, high = trt_profile(settings, working_width)
    return OptimizationProfile(INPUT_NAME, image(low), image(opt), image(high))


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
    build nothing and return served format "onnx" with the reason. The profile holds the
    graph's working width (from its serving contract)."""
    reason = engine_unavailable_reason()
    if reason is not None:
        return EngineResult("onnx", f"no TensorRT engine built: {reason}")
    profile = optimization_profile(settings, read_contract(Path(onnx_path)).working_width)
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
    shapes = builder.create_optimization_profile()
    shapes.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(shapes)
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


def plan_runner(plan: Path) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
    """Run a TensorRT plan on GPU 0 with torch's CUDA memory: (N, 3, H, W) float32 in, the
    probabilities out, as float32. Only where a plan could be built."""
    import torch

    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        Path(plan).read_bytes()
    )
    if engine is None:
        raise RuntimeError(f"{plan}: TensorRT {trt.__version__} cannot load this plan")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        image = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).cuda()
        context.set_input_shape(INPUT_NAME, tuple(image.shape))
        context.set_tensor_address(INPUT_NAME, image.data_ptr())
        buffers = {}
        for name in outputs:
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.float16 else torch.float32
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{plan}: TensorRT execution failed for input {batch.shape}")
        stream.synchronize()
        return np.asarray(buffers[OUTPUT_NAME].float().cpu().numpy(), np.float32)

    return run
