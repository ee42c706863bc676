"""Bad input at a real local Triton: each request gets an error that names the problem (and
the photograph's file, client-side), and afterwards the server is still live and ready and
answers a good request with ONNX Runtime's output.

Raw tritonclient requests reach the server with whatever data type and shape they declare;
`drseg predict` refuses a bad photograph before sending anything.
"""

from __future__ import annotations

import re
import struct
import zlib
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

from drseg.serving.client import Protocol, predict
from tests.export import WORKING_WIDTH
from tests.serving import MAX_INPUT_PIXELS, VERSION, Served, direct, url

GOOD = np.random.default_rng(4).standard_normal((1, 3, 64, 96)).astype(np.float32)

BAD_TENSORS = [
    pytest.param(
        (1, 3, 64, 64),
        np.float64,
        r"data-type is 'FP64', but model 'drseg' expects 'FP32'",
        id="float64",
    ),
    pytest.param(
        (1, 3, 64, 64),
        np.uint8,
        r"data-type is 'UINT8', but model 'drseg' expects 'FP32'",
        id="uint8",
    ),
    pytest.param(
        (1, 4, 64, 64), np.float32, r"Expected \[-1,3,-1,-1\], got \[1,4,64,64\]", id="4-channels"
    ),
    pytest.param((3, 64, 64), np.float32, r"Expected \[-1,3,-1,-1\], got \[3,64,64\]", id="rank-3"),
    pytest.param(
        (1, 3, 100, 64),
        np.float32,
        r"input 'image': an image of 100 x 64 pixels \(height x width\); height and width must "
        r"be multiples of 32: pad at the bottom and right",
        id="side-not-multiple-of-32",
    ),
    # pytriton's backend stub refuses an empty tensor before the bound function, in its words.
    pytest.param(
        (1, 3, 0, 64),
        np.float32,
        r"cannot cast view with zeros in shape",
        id="zero-height",
    ),
    pytest.param(
        (0, 3, 64, 64), np.float32, r"byte size mismatch for input 'image'", id="zero-batch"
    ),
    pytest.param(
        (1, 3, 544, 544),
        np.float32,
        rf"input 'image': an image of 544 x 544 pixels \(height x width\) is over "
        rf"serve.max_input_pixels \({MAX_INPUT_PIXELS}\); resize the photograph to the model's "
        rf"working width \({WORKING_WIDTH}\)",
        id="over-max-pixels",
    ),
    pytest.param(
        (5, 3, 64, 64), np.float32, r"batch-size must be <= 4 for 'drseg'", id="batch-over-max"
    ),
]


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
@pytest.mark.parametrize(("shape", "dtype", "message"), BAD_TENSORS)
def test_a_bad_tensor_gets_a_clear_error_and_the_server_keeps_serving(
    served: Served,
    expected: npt.NDArray[np.float32],
    protocol: Protocol,
    shape: tuple[int, ...],
    dtype: type[np.generic],
    message: str,
) -> None:
    client = _module(protocol).InferenceServerClient(url(served.server, protocol))
    try:
        with pytest.raises(InferenceServerException, match=message):
            _infer(client, protocol, np.zeros(shape, dtype))
    finally:
        client.close()
    _assert_still_serving(served, protocol, expected)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG without pixel data (an empty IDAT): what a huge photograph shows
    before its pixels are read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _bad_photographs(good: Path) -> dict[str, tuple[bytes, str]]:
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
    }


@pytest.mark.integration
@pytest.mark.parametrize(
    "name", ["empty.jpg", "truncated.jpg", "truncated.png", "notes.png", "huge.png"]
)
def test_predict_refuses_a_bad_photograph_naming_it_and_the_server_keeps_serving(
    served: Served, expected: npt.NDArray[np.float32], name: str, tmp_path: Path
) -> None:
    content, message = _bad_photographs(served.photos[0])[name]
    photo = tmp_path / name
    photo.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(photo))}: {message}"):
        predict([photo], served.server.http_url, "http", out, served.onnx_path)
    assert not (out / photo.stem).exists()
    (result,) = predict(served.photos[:1], served.server.http_url, "http", out, served.onnx_path)
    assert (result.folder / "lesions.json").is_file()
    _assert_still_serving(served, "http", expected)
