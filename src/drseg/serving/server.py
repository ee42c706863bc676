"""`drseg serve`: a real Triton server on this machine, serving a model repository's ONNX.

The server is Triton itself (the tritonserver that nvidia-pytriton bundles), so clients,
health (/v2/health/live, /v2/health/ready), model metadata and config, and Prometheus
metrics (<metrics port>/metrics) are Triton's own. That build has only the Python backend,
so ONNX Runtime runs inside the bound Python function, in this process, on the
repository's model.onnx; the model is exposed under the name, version, inputs, outputs,
batch size and dynamic batching of the repository's config.pbtxt. On a cluster the same
repository runs in the Triton image with its ONNX Runtime or TensorRT backend instead.
A bad request gets a 400 naming the problem (no traceback) and the server keeps serving:
Triton itself refuses a wrong data type, rank, channel count or batch size, drseg's stub
extension (drseg.serving.bad_requests) an empty tensor or NaN/infinite values, and the bound
function what depends on the contract (`_check_images`).

Preprocessing stays on the client (drseg.serving.client), which applies the contract stored
in the ONNX file; the server serves the raw graph. That keeps the served interface the
one config.pbtxt describes, identical here and under the real backends (a server-side
BYTES model would exist only in the Python backend and would need an ensemble on the
cluster), and the CPU-heavy decode, resize and CLAHE scale with the clients, not the GPU.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tritonclient.grpc import model_config_pb2

from drseg.config import ServeSettings
from drseg.contract import ServingContract, read_contract
from drseg.serving.bad_requests import BadRequest, refusing_bad_requests
from drseg.serving.repository import CONFIG_FILE, ONNX_PLATFORM, read_config, version_onnx

_NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: int
    onnx_path: Path
    config: Any
    """model_config_pb2.ModelConfig read from the repository's config.pbtxt."""


def resolve_model(repository: Path, model_name: str, version: int | None = None) -> ServedModel:
    """The model folder's config and the model.onnx of `version` (None: the latest)."""
    repository = Path(repository)
    config = read_config(repository / model_name / CONFIG_FILE)
    if config.platform != ONNX_PLATFORM:
        raise ValueError(
            f"{repository / model_name / CONFIG_FILE}: platform {config.platform!r}; the local "
            f"server runs ONNX Runtime only, so serve a repository written without a plan "
            f"(a TensorRT plan needs the Triton image on a GPU node)"
        )
    chosen, onnx_path = version_onnx(repository, model_name, version)
    return ServedModel(model_name, chosen, onnx_path, config)


def _tensors(entries: Any, source: Path) -> list[Tensor]:
    tensors = []
    for entry in entries:
        type_name = model_config_pb2.DataType.Name(entry.data_type)
        if type_name not in _NUMPY_TYPES:
            raise ValueError(f"{source}: {entry.name!r} has type {type_name}; expected FP32/FP16")
        tensors.append(
            Tensor(name=entry.name, dtype=_NUMPY_TYPES[type_name], shape=tuple(entry.dims))
        )
    return tensors


def onnx_session(model: ServedModel, threads: int) -> ort.InferenceSession:
    """ONNX Runtime on the CPU as the local server runs it (`threads`: serve.ort_threads),
    checked against config.pbtxt's input and output names."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(model.onnx_path), options, providers=["CPUExecutionProvider"]
    )
    graph = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    config = ([i.name for i in model.config.input], [o.name for o in model.config.output])
    if graph != config:
        raise ValueError(
            f"{model.onnx_path}: graph inputs/outputs {graph} differ from {CONFIG_FILE}'s "
            f"{config}; write the repository again from this ONNX file"
        )
    return session


def _check_images(images: npt.NDArray[Any], contract: ServingContract, max_pixels: int) -> None:
    """Refuse, naming the fix, the images that Triton's own checks let through.

    Triton checks data type, rank, channels and batch size against config.pbtxt before a
    request reaches the bound function, and the stub extension refuses empty and non-finite
    tensors per request, but height and width are dynamic: sides that are not multiples of
    the contract's (the decoder would resize feature maps, which training never did) and
    images too large for memory arrive here. A BadRequest becomes a 400 for the batch and
    the server keeps serving (pytriton's PyTritonUnrecoverableError would shut it down).
    Dynamic batching merges same-shape requests only, so every request of the batch shares
    the problem and a refusal never fails another client's good request.
    """
    name, multiple = contract.input_name, contract.size_multiple
    height, width = images.shape[-2:]
    size = f"an image of {height} x {width} pixels (height x width)"
    if height * width > max_pixels:
        raise BadRequest(
            f"input {name!r}: {size} is over serve.max_input_pixels ({max_pixels}); resize "
            f"the photograph to the model's working width ({contract.working_width}) as "
            f"drseg predict does, or raise serve.max_input_pixels"
        )
    if height % multiple or width % multiple:
        raise BadRequest(
            f"input {name!r}: {size}; height and width must be multiples of {multiple}: pad "
            f"at the bottom and right by repeating edge pixels as drseg predict does "
            f"(drseg.export.onnx_export.pad_to_multiple)"
        )


def _infer_function(
    session: ort.InferenceSession, contract: ServingContract, max_pixels: int
) -> Callable[..., Any]:
    """Triton's batched request (one array per input) -> one array per output."""
    output_names = [o.name for o in session.get_outputs()]

    def infer(**inputs: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        _check_images(inputs[contract.input_name], contract, max_pixels)
        results = session.run(output_names, inputs)
        return dict(zip(output_names, results, strict=True))

    batched: Callable[..., Any] = batch(infer)
    return batched


def _instances(config: Any) -> int:
    """config.pbtxt's instance count; each instance is a handler thread sharing the ONNX
    Runtime session (its run() is thread-safe). The Python backend runs on the CPU, so the
    kind (KIND_GPU on a cluster) does not apply here."""
    return max(1, int(sum(group.count for group in config.instance_group)))


def _prefer_interpreter_libpython() -> None:
    """The bundled backend stub links libpython3.11.so: without the running interpreter's
    LIBDIR on LD_LIBRARY_PATH it can pick up another build and fail to load the model with
    "'_thread.RLock' object has no attribute '_recursion_count'"."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


@dataclass(frozen=True)
class RunningServer:
    model: ServedModel
    http_url: str
    """host:port, the form tritonclient takes."""
    grpc_url: str
    metrics_url: str
    triton: Triton

    def wait(self) -> None:
        """Block while the server is alive; returns on Ctrl-C or when Triton stops."""
        self.triton.serve()


@contextlib.contextmanager
def running_server(
    repository: Path,
    settings: ServeSettings,
    version: int | None = None,
    log_file: Path | None = None,
) -> Iterator[RunningServer]:
    """Start Triton with the repository's model loaded; stop it when the block ends.

    Ready when this yields (Triton's /v2/health/ready answers 200). `log_file`: Triton's
    log goes there instead of the console.
    """
    model = resolve_model(Path(repository), settings.model_name, version)
    session = onnx_session(model, settings.ort_threads)
    contract = read_contract(model.onnx_path)
    config_path = Path(repository) / model.name / CONFIG_FILE
    batcher = model.config.dynamic_batching
    _prefer_interpreter_libpython()
    triton = Triton(
        config=TritonConfig(
            http_address=settings.host,
            http_port=settings.http_port,
            grpc_address=settings.host,
            grpc_port=settings.grpc_port,
            metrics_address=settings.host,
            metrics_port=settings.metrics_port,
            exit_timeout_secs=settings.exit_timeout_s,
            log_file=None if log_file is None else Path(log_file),
        )
    )
    try:
        # pytriton sends the stub to Triton when the model loads, in bind() or run().
        with refusing_bad_requests():
            triton.bind(
                model_name=model.name,
                infer_func=[
                    _infer_function(session, contract, settings.max_input_pixels)
                    for _ in range(_instances(model.config))
                ],
                inputs=_tensors(model.config.input, config_path),
                outputs=_tensors(model.config.output, config_path),
                model_version=model.version,
                config=ModelConfig(
                    max_batch_size=model.config.max_batch_size,
                    batcher=DynamicBatcher(
                        preferred_batch_size=list(batcher.preferred_batch_size),
                        max_queue_delay_microseconds=batcher.max_queue_delay_microseconds,
                    ),
                ),
                strict=True,
            )
            triton.run()
        host = settings.host
        yield RunningServer(
            model,
            f"{host}:{settings.http_port}",
            f"{host}:{settings.grpc_port}",
            f"http://{host}:{settings.metrics_port}/metrics",
            triton,
        )
    finally:
        triton.stop()


def serve(repository: Path, settings: ServeSettings, version: int | None = None) -> None:
    """`drseg serve`: run until Ctrl-C."""
    with running_server(repository, settings, version) as server:
        print(
            f"serving {server.model.name} version {server.model.version} "
            f"({server.model.onnx_path}): HTTP {server.http_url}, gRPC {server.grpc_url}, "
            f"metrics {server.metrics_url}; health: http://{server.http_url}/v2/health/ready",
            flush=True,
        )
        server.wait()
