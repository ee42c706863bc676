"""Bad input at a real local Triton: each request gets an error that names the problem (and
the photograph's file, client-side), and afterwards the server is still live and ready and
answers a good request with ONNX Runtime's output.

Raw tritonclient requests reach the server with whatever data type and shape they declare;
`drseg predict` refuses a bad photograph before sending anything.
"""

from __future__ import annotations

import re
import struct
import time
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from drseg.config import ServeSettings
from drseg.serving.client import PhotoFailure, PhotoResult, Protocol, predict
from drseg.serving.repository import write_repository
from drseg.serving.server import running_server
from tests.export import WORKING_WIDTH
from tests.serving import MAX_INPUT_PIXELS, VERSION, Served, direct, serve_settings, url

GOOD = np.random.default_rng(4).standard_normal((1, 3, 64, 96)).astype(np.float32)

BAD_TENSORS = [
    pytest.param(
        (1, 3, 64, 64),
        np.float64,
        0.0,
        r"data-type is 'FP64', but model 'drseg' expects 'FP32'",
        id="float64",
    ),
    pytest.param(
        (1, 3, 64, 64),
        np.uint8,
        0,
        r"data-type is 'UINT8', but model 'drseg' expects 'FP32'",
        id="uint8",
    ),
    pytest.param(
        (1, 4, 64, 64),
        np.float32,
        0.0,
        r"Expected \[-1,3,-1,-1\], got \[1,4,64,64\]",
        id="4-channels",
    ),
    pytest.param(
        (3, 64, 64), np.float32, 0.0, r"Expected \[-1,3,-1,-1\], got \[3,64,64\]", id="rank-3"
    ),
    pytest.param(
        (1, 3, 100, 64),
        np.float32,
        0.0,
        r"input 'image': an image of 100 x 64 pixels \(height x width\); height and width must "
        r"be multiples of 32: pad at the bottom and right",
        id="side-not-multiple-of-32",
    ),
    pytest.param(
        (1, 3, 0, 64),
        np.float32,
        0.0,
        r"input 'image': an empty tensor \(shape \[1, 3, 0, 64\]\); send at least one image",
        id="zero-height",
    ),
    pytest.param(
        (1, 3, 0, 0),
        np.float32,
        0.0,
        r"input 'image': an empty tensor \(shape \[1, 3, 0, 0\]\)",
        id="zero-by-zero",
    ),
    pytest.param(
        (0, 3, 64, 64), np.float32, 0.0, r"byte size mismatch for input 'image'", id="zero-batch"
    ),
    pytest.param(
        (1, 3, 544, 544),
        np.float32,
        0.0,
        rf"input 'image': an image of 544 x 544 pixels \(height x width\) is over "
        rf"serve.max_input_pixels \({MAX_INPUT_PIXELS}\); resize the photograph to the model's "
        rf"working width \({WORKING_WIDTH}\)",
        id="over-max-pixels",
    ),
    pytest.param(
        (5, 3, 64, 64), np.float32, 0.0, r"batch-size must be <= 4 for 'drseg'", id="batch-over-max"
    ),
    pytest.param(
        (1, 3, 64, 64),
        np.float32,
        np.nan,
        r"input 'image': 1 of 12288 values are NaN or infinite; send finite values",
        id="nan",
    ),
    pytest.param(
        (1, 3, 64, 64),
        np.float32,
        -np.inf,
        r"input 'image': 1 of 12288 values are NaN or infinite",
        id="infinity",
    ),
]
REFUSED = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
"""What a refused request gets: the client's fault, not the server's (500, INTERNAL)."""


def _bad_array(shape: tuple[int, ...], dtype: type[np.generic], fill: float) -> np.ndarray:
    """Zeros of `shape`, with `fill` in the first element."""
    array = np.zeros(shape, dtype)
    if array.size:
        array.flat[0] = fill
    return array


def _failures(served: Served) -> int:
    """Triton's failed-request counter of the model, all reasons together."""
    return _metric(served, "nv_inference_request_failure")


def _module(protocol: Protocol) -> ModuleType:
    return httpclient if protocol == "http" else grpcclient


def _infer(client: Any, protocol: Protocol, array: npt.NDArray[np.generic]) -> np.ndarray:
    """One raw request declaring the array's own data type and shape."""
    module = _module(protocol)
    request = module.InferInput("image", list(array.shape), np_to_triton_dtype(array.dtype))
    request.set_data_from_numpy(array)
    result = client.infer("drseg", [request], model_version=str(VERSION))
    return np.asarray(result.as_numpy("probabilities"))


@pytest.fixture(scope="module")
def expected(served: Served) -> npt.NDArray[np.float32]:
    """ONNX Runtime's answer to GOOD, called directly."""
    return direct(served.onnx_path, GOOD)


def _assert_still_serving(
    served: Served, protocol: Protocol, expected: npt.NDArray[np.float32]
) -> None:
    client = _module(protocol).InferenceServerClient(url(served.server, protocol))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("drseg", str(VERSION))
        np.testing.assert_allclose(_infer(client, protocol, GOOD), expected, atol=1e-6)
    finally:
        client.close()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(("shape", "dtype", "fill", "message"), BAD_TENSORS)
def test_a_bad_tensor_gets_a_400_naming_it_without_traceback_nor_failure_count(
    served: Served,
    expected: npt.NDArray[np.float32],
    protocol: Protocol,
    shape: tuple[int, ...],
    dtype: type[np.generic],
    fill: float,
    message: str,
) -> None:
    """Refused by Triton, by drseg's stub extension (empty, NaN, infinite) or by the bound
    function (sides, size): a 400 / INVALID_ARGUMENT, one line, and Triton's failure counter
    (what the canary analysis compares) does not move."""
    failures = _failures(served)
    successes = _metric(served, "nv_inference_request_success")
    client = _module(protocol).InferenceServerClient(url(served.server, protocol))
    try:
        with pytest.raises(InferenceServerException, match=message) as refused:
            _infer(client, protocol, _bad_array(shape, dtype, fill))
    finally:
        client.close()
    assert refused.value.status() == REFUSED[protocol]
    assert "Traceback" not in str(refused.value) and ".py" not in str(refused.value)
    _assert_still_serving(served, protocol, expected)
    # Counters show up a moment after the answers: once the good request's success shows,
    # so would the refused one's failure.
    _settled_metric(served, "nv_inference_request_success", successes)
    assert _failures(served) == failures


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG without pixel data (an empty IDAT): what a huge photograph shows
    before its pixels are read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _bad_photographs(good: Path) -> dict[str, tuple[bytes | None, str]]:
    """File name -> (content, the error expected after the file's path)."""
    rgb = cv2.imread(str(good))
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    png = cv2.imencode(".png", rgb)[1].tobytes()
    truncated = r"unreadable or truncated image .*; copy the file again from its source"
    return {
        "empty.jpg": (b"", r"empty file \(0 bytes\); copy the photograph again from its source"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], truncated),
        "truncated.png": (png[: len(png) // 2], truncated),
        "notes.png": (b"not an image", r"unreadable image .*; re-export the file as JPEG, PNG"),
        "huge.png": (
            _png_header(9000, 9000),
            r"image is 9000x9000 \(81 MP\), over the limit of 60 MP",
        ),
        "gone.png": (None, r"photograph not found; pass an existing image file"),
    }


@pytest.mark.integration
@pytest.mark.parametrize(
    "name", ["empty.jpg", "truncated.jpg", "truncated.png", "notes.png", "huge.png", "gone.png"]
)
def test_predict_reports_a_bad_photograph_in_one_line_and_goes_on_with_the_others(
    served: Served, expected: npt.NDArray[np.float32], name: str, tmp_path: Path
) -> None:
    """good, bad, good in one call: both good photographs are answered, the bad one is one
    line naming its file, and the server keeps serving."""
    content, message = _bad_photographs(served.photos[0])[name]
    photo = tmp_path / name
    if content is not None:
        photo.write_bytes(content)
    out = tmp_path / "out"
    first, second = served.photos[:2]
    outcomes = list(
        predict([first, photo, second], served.server.http_url, "http", out, served.onnx_path)
    )
    assert [type(o) for o in outcomes] == [PhotoResult, PhotoFailure, PhotoResult]
    failure = outcomes[1]
    assert isinstance(failure, PhotoFailure)
    assert re.match(rf"^{re.escape(str(photo))}: {message}", failure.message)
    assert "\n" not in failure.message
    assert not (out / photo.stem).exists()
    assert {p.name for p in out.iterdir()} == {first.stem, second.stem}
    _assert_still_serving(served, "http", expected)


@pytest.mark.integration
def test_predict_honours_the_size_limit_it_suggests(served: Served, tmp_path: Path) -> None:
    """The photograph is 256 px wide: with ingest.max_pixels below its size it is refused
    from its header, as ingest would refuse it."""
    (outcome,) = predict(
        served.photos[:1],
        served.server.http_url,
        "http",
        tmp_path,
        served.onnx_path,
        max_pixels=1000,
    )
    assert isinstance(outcome, PhotoFailure)
    assert "over the limit of 0 MP" in outcome.message
    assert "raise ingest.max_pixels" in outcome.message


@pytest.fixture(scope="module")
def batching(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server whose dynamic batcher waits (up to 30 s) for a second request, so two
    same-shape requests sent together run as one batch."""
    work = tmp_path_factory.mktemp("batching")
    settings = ServeSettings(
        max_batch_size=2, preferred_batch_sizes=(2,), max_queue_delay_us=30_000_000
    )
    version_dir = write_repository(work / "repo", exported, VERSION, settings)
    with running_server(work / "repo", serve_settings(), log_file=work / "triton.log") as server:
        yield Served(server, version_dir / "model.onnx", [])


def _metric(served: Served, name: str) -> int:
    """A counter of Triton's metrics for the model, summed over its labels."""
    with urllib.request.urlopen(served.server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    counts = [line.rsplit(" ", 1)[1] for line in lines if line.startswith(f"{name}{{")]
    assert counts, f"no {name} in Triton's metrics"
    return sum(int(float(count)) for count in counts)


def _settled_metric(served: Served, name: str, before: int) -> int:
    """The counter once it has moved from `before`: Triton publishes counters a moment after
    the answers (seen at 0 under load), so wait for the change, bounded."""
    deadline = time.monotonic() + 30
    while (value := _metric(served, name)) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_nan_request_batched_with_a_good_one_does_not_fail_it(
    batching: Served, expected: npt.NDArray[np.float32], protocol: Protocol
) -> None:
    """Sent together, same shape, run as one batch (one execution for two requests): the
    refusal is per request, so the good one gets ONNX Runtime's output."""

    def send(array: npt.NDArray[np.float32]) -> np.ndarray | InferenceServerException:
        client = _module(protocol).InferenceServerClient(url(batching.server, protocol))
        try:
            return _infer(client, protocol, array)
        except InferenceServerException as exc:
            return exc
        finally:
            client.close()

    executions = _metric(batching, "nv_inference_exec_count")
    with ThreadPoolExecutor(max_workers=2) as pool:
        refused, answered = pool.map(send, [_bad_array(GOOD.shape, np.float32, np.nan), GOOD])
    assert _settled_metric(batching, "nv_inference_exec_count", executions) == executions + 1, (
        "not one batch"
    )
    assert isinstance(refused, InferenceServerException)
    assert refused.status() == REFUSED[protocol]
    assert "NaN or infinite" in str(refused.message())
    assert isinstance(answered, np.ndarray)
    np.testing.assert_allclose(answered, expected, atol=1e-6)
