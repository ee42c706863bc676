"""Latency and throughput of serving one photograph: local Triton vs the bare runtimes.

One working-size photograph through local Triton (HTTP, gRPC), next to ONNX Runtime called
directly and PyTorch eager, in the same run.

The model is configs/local.yaml's (resnet18 U-Net, working width 512) with untrained weights,
as the serving tests export it (latency does not depend on the weights), or --onnx. The
photograph is a synthetic fundus prepared as `drseg predict` prepares one (resize, CLAHE,
normalise, pad to a multiple of 32); batch 8 is eight copies in one request. Triton runs in
this process as `drseg serve` runs it (`running_server`: tritonserver, its Python backend
stub, the bound ONNX Runtime session) with the default serve settings but max_batch_size 8;
the requests go through the client `drseg predict` uses. ONNX Runtime direct is a session
made by the server's own `onnx_session`, so threads and options match; PyTorch runs the same
architecture in eval mode with the sigmoid, as the graph does. Each path gets warm-up calls,
then the timed calls are interleaved (one of each in turn) so that a change of load on a
shared machine hits every path alike; Triton's overhead is also given as the median of the
per-round ratios to ONNX Runtime, which pairs calls made seconds apart. Requests are
sequential: throughput is images over the summed request times.

    python bench/serve_latency.py [--onnx model.onnx] [--width 512] [--batches 1 8]
                                  [--repeats 10] [--warmup 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*: the tests' tiny model

from tests.serving import export_tiny, serve_settings

from drseg.config import (
    IngestSettings,
    ModelSettings,
    ServeSettings,
)
from drseg.contract import ServingContract, read_contract
from drseg.data.synthetic import write_synthetic_dataset
from drseg.models.unet import build_model
from drseg.serving.client import Floats, TritonModel, prepare_photograph
from drseg.serving.repository import write_repository
from drseg.serving.server import onnx_session, resolve_model, running_server

Call = Callable[[Floats], Floats]
Seconds = npt.NDArray[np.float64]
MAX_SERVED_DIFF = 1e-5
"""Served and direct ONNX Runtime outputs must agree: pytriton's stub under the wrong numpy
receives all-zero inputs without any error (STACK.md), which would time the wrong thing."""


def photograph_input(work: Path, contract: ServingContract) -> Floats:
    """One synthetic photograph as `drseg predict` sends it: (3, H, W), H and W padded."""
    write_synthetic_dataset(work / "photo", n=1, seed=0, width=2 * contract.working_width)
    photo = next((work / "photo" / "images").iterdir())
    return prepare_photograph(photo, contract).model_input


def direct_call(session: ort.InferenceSession, contract: ServingContract) -> Call:
    """All graph outputs, as the server's bound function computes them."""
    return lambda batch: np.asarray(session.run(None, {contract.input_name: batch})[0])


def triton_call(model: TritonModel, contract: ServingContract) -> Call:
    return lambda batch: model.infer(contract.input_name, batch, contract.output_name)


def eager_call(contract: ServingContract) -> Call:
    """The served architecture in PyTorch (random weights: timing only)."""
    network = build_model(
        ModelSettings(
            encoder=contract.encoder,
            classes=contract.classes,
            reconstruction_weight=0.1 if contract.reconstruction_name else 0.0,
        )
    ).eval()

    def call(batch: Floats) -> Floats:
        with torch.inference_mode():
            logits, _ = network(torch.from_numpy(batch))
            return np.asarray(torch.sigmoid(logits).numpy())

    return call


def check_served(calls: dict[str, Call], batch: Floats) -> None:
    """Each Triton path must return what ONNX Runtime returns directly."""
    reference = calls["ONNX Runtime direct"](batch)
    for name in ("Triton HTTP", "Triton gRPC"):
        diff = float(np.abs(calls[name](batch) - reference).max())
        if not diff <= MAX_SERVED_DIFF:
            raise RuntimeError(
                f"{name}: output differs from direct ONNX Runtime by {diff:.3g}; the timings "
                f"would not be of the model (check the stub's numpy, STACK.md)"
            )


def measure(calls: dict[str, Call], batch: Floats, warmup: int, repeats: int) -> dict[str, Seconds]:
    """Seconds per call, per path. The timed calls take turns, and each round starts at the
    next path, so every path follows every other equally often (a path's idle threads may
    still spin when the next one starts)."""
    for call in calls.values():
        for _ in range(warmup):
            call(batch)
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            calls[name](batch)
            seconds[name].append(time.perf_counter() - started)
    return {name: np.asarray(s, np.float64) for name, s in seconds.items()}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass(frozen=True)
class Run:
    contract: ServingContract
    settings: ServeSettings
    input_shape: tuple[int, ...]
    """(3, H, W) of one photograph."""
    seconds: dict[int, dict[str, Seconds]]
    """batch size -> path -> seconds per request."""


def run(args: argparse.Namespace, work: Path) -> Run:
    """Export (unless --onnx), serve, and time every path at every batch size."""
    # The serving tests' resnet18 U-Net (random weights) at working width args.width.
    onnx_path = args.onnx or export_tiny(work, IngestSettings(working_width=args.width))
    contract = read_contract(onnx_path)
    batch_one = photograph_input(work, contract)[None]
    version = contract.model_version or 1
    settings = serve_settings(max_batch_size=max(8, *args.batches), ort_threads=args.threads)
    write_repository(work / "repo", onnx_path, version, settings)
    session = onnx_session(resolve_model(work / "repo", settings.model_name), args.threads)
    with running_server(work / "repo", settings, log_file=work / "triton.log") as server:
        clients = [
            TritonModel(url, protocol, settings.model_name, str(version), 600.0)
            for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url))
        ]
        try:
            calls = {
                "Triton HTTP": triton_call(clients[0], contract),
                "Triton gRPC": triton_call(clients[1], contract),
                "ONNX Runtime direct": direct_call(session, contract),
                "PyTorch eager": eager_call(contract),
            }
            check_served(calls, batch_one)
            seconds = {
                size: measure(calls, np.repeat(batch_one, size, axis=0), args.warmup, args.repeats)
                for size in args.batches
            }
        finally:
            for client in clients:
                client.close()
    return Run(contract, settings, batch_one.shape[1:], seconds)


def report(result: Run, args: argparse.Namespace, loads: tuple[str, str]) -> None:
    """The set-up line, a Markdown table, and Triton's overhead at batch 1."""
    _, height, width = result.input_shape
    settings = result.settings
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime {ort.__version__} "
        f"(intra-op threads {args.threads or 'default'}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {result.contract.encoder} U-Net, input "
        f"3x{height}x{width} (working width {result.contract.working_width}); {args.warmup} "
        f"warm-up + {args.repeats} timed requests per path and batch; serve: max_batch_size "
        f"{settings.max_batch_size}, preferred {list(settings.preferred_batch_sizes)}, queue "
        f"delay {settings.max_queue_delay_us} us; load average {loads[0]} -> {loads[1]}"
    )
    print("| batch | path | p50 ms | p99 ms | img/s |")
    print("|---|---|---|---|---|")
    for size, per_path in result.seconds.items():
        for name, seconds in per_path.items():
            p50, p99 = 1000 * np.percentile(seconds, [50, 99])
            rate = size * len(seconds) / float(seconds.sum())
            print(f"| {size} | {name} | {p50:.1f} | {p99:.1f} | {rate:.2f} |")
    if 1 in result.seconds:
        per_path = result.seconds[1]
        direct = per_path["ONNX Runtime direct"]
        for name in ("Triton HTTP", "Triton gRPC"):
            of_p50 = np.median(per_path[name]) / np.median(direct) - 1
            paired = np.median(per_path[name] / direct) - 1
            print(
                f"{name} over direct ONNX Runtime at batch 1: {100 * of_p50:+.1f} % (p50s), "
                f"{100 * paired:+.1f} % (median of the rounds' ratios) (target <= +10 %)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, help="an exported model.onnx (default: untrained)")
    parser.add_argument("--width", type=int, default=512, help="working width of the default")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10, help="timed requests per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per path first")
    parser.add_argument(
        "--threads", type=int, default=0, help="serve.ort_threads (0: ONNX Runtime's choice)"
    )
    args = parser.parse_args()
    started = load()
    with tempfile.TemporaryDirectory(prefix="drseg-bench-") as tmp:
        result = run(args, Path(tmp))
    report(result, args, (started, load()))


if __name__ == "__main__":
    main()
