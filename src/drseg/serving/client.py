"""Segment photographs with a served model: photograph -> Triton -> masks, overlay, areas.

The contract (working width, CLAHE, normalisation, classes, thresholds, version) is read
from the exported ONNX file the caller names: the one in the served repository
(``<repo>/<model>/<version>/model.onnx``, kept there beside a TensorRT plan too) or the
registry's. Every request is pinned to the contract's model version, and a server that does
not serve that version is refused, so preprocessing and thresholds always belong to the
model that answers. The server's own model metadata is checked against the contract (names,
class count) before any request. It is not read from Triton's config endpoint: pytriton
writes the Python backend's parameters itself, so the local server could not publish it.

Every photograph of a call is attempted: one that cannot be read or that the server refuses
is reported (one line) and the next goes on. A re-run into the same output folder skips a
photograph already answered by the same model version and replaces an older answer.

Preprocessing is the training path, by the same functions: decode (drseg.data.validation),
resize to the working width, field of view and CLAHE (drseg.preprocess), then
(rgb / 255 - mean) / std with the contract's values. The whole working-size image goes in
one request, padded at the bottom and right to a multiple of 32 by repeating edge pixels
(as tiled evaluation pads), and the output is cropped back. No tiling: the network is
fully convolutional and a working-size image (1024 x 704 padded, for IDRiD) is one
request; the TensorRT profile is derived to hold it (drseg.config.trt_profile). The gate
scores exactly this path (drseg.evaluate.served: these functions, ONNX Runtime in place of
the round trip), so the thresholds were tuned on what this client sends.
A pixel is a lesion when its probability is >= the class threshold and it lies inside the
field of view (evaluation scores only the field of view).

Outputs per photograph, at the working size, in ``<out_dir>/<photograph stem>/`` (built
under a temporary name, renamed when complete): ``overlay.png`` (lesions filled in class
colours, their legend underneath), ``mask_<class>.png`` (0/255) and ``lesions.json``
(lesion pixels, share of the field of view and connected components per class;
``source_pixels_per_pixel`` converts areas to the photograph's own resolution).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from drseg import atomic
from drseg.classes import CLASS_COLOURS, OTHER_COLOUR
from drseg.config import IngestSettings
from drseg.contract import ServingContract, pad_to_multiple, read_contract
from drseg.data import dataset
from drseg.data.validation import Rejected, decode_image, read_header
from drseg.legend import with_legend
from drseg.preprocess import clahe, fov_mask, resize_image, working_size

Protocol = Literal["http", "grpc"]
Image = npt.NDArray[np.uint8]
Masks = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float32]

OVERLAY_FILE = "overlay.png"
SUMMARY_FILE = "lesions.json"
OVERLAY_ALPHA = 0.45

MAX_PIXELS = IngestSettings().max_pixels
"""The photograph size ingest accepts; larger files are refused from their header."""


@dataclass(frozen=True)
class PreparedPhotograph:
    path: Path
    source_size: tuple[int, int]
    """(width, height) of the file."""
    rgb: Image
    """At the working size, before CLAHE: what the overlay is drawn on."""
    fov: Masks
    model_input: Floats
    """(3, H', W') float32, normalised, padded to the contract's size multiple."""


def normalise(rgb: Image, contract: ServingContract) -> Floats:
    """H x W x 3 uint8 -> 3 x H x W float32, (rgb / 255 - mean) / std."""
    mean = np.asarray(contract.mean, np.float32)[:, None, None]
    std = np.asarray(contract.std, np.float32)[:, None, None]
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return np.asarray((chw - mean) / std, np.float32)


def prepare_photograph(
    path: Path, contract: ServingContract, max_pixels: int = MAX_PIXELS
) -> PreparedPhotograph:
    """Decode, resize, field of view, CLAHE and normalise exactly as ingest + clahe +
    training did, with the contract's parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: photograph not found; pass an existing image file")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: empty file (0 bytes); copy the photograph again from its source")
    try:
        header = read_header(data, path.stem, str(path), max_pixels)
        rgb = decode_image(data, header, path.stem, str(path), contract.working_width).rgb
    except Rejected as exc:
        problem = exc.problem
        raise ValueError(f"{problem.path}: {problem.problem}; {problem.fix}") from exc
    image = resize_image(rgb, working_size(header.width, header.height, contract.working_width))
    fov = fov_mask(image)
    if not fov.any():
        raise ValueError(
            f"{path}: no field of view found (the photograph is almost all black); pass a "
            f"colour fundus photograph"
        )
    enhanced = clahe(image, fov, contract.clahe_clip_limit, contract.clahe_tile_grid)
    model_input = pad_to_multiple(normalise(enhanced, contract), contract.size_multiple)
    return PreparedPhotograph(path, (header.width, header.height), image, fov, model_input)


def lesion_masks(probabilities: Floats, fov: Masks, contract: ServingContract) -> Masks:
    """(C, H, W) probabilities -> (C, H, W) bool: >= the class threshold, inside the FOV."""
    thresholds = np.array([contract.thresholds[c] for c in contract.classes], np.float64)
    return np.asarray((probabilities >= thresholds[:, None, None]) & fov[None])


def served_masks(output: Floats, prepared: PreparedPhotograph, contract: ServingContract) -> Masks:
    """A batch-of-one response -> (C, H, W) masks at the working size (padding cropped off)."""
    height, width = prepared.fov.shape
    return lesion_masks(output[0, :, :height, :width], prepared.fov, contract)


def lesion_summary(
    masks: Masks, fov: Masks, contract: ServingContract
) -> dict[str, dict[str, Any]]:
    """Per class: lesion pixels, their share of the field of view, connected components
    (8-connected: diagonal neighbours belong to the same lesion)."""
    fov_pixels = max(1, int(fov.sum()))
    summary = {}
    for cls, mask in zip(contract.classes, masks, strict=True):
        pixels = int(mask.sum())
        components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
        summary[cls] = {
            "threshold": contract.thresholds[cls],
            "lesion_pixels": pixels,
            "fov_fraction": pixels / fov_pixels,
            "components": int(components),
        }
    return summary


def overlay(rgb: Image, masks: Masks, classes: Sequence[str]) -> Image:
    """The photograph with each class's lesions filled in its translucent colour, and the
    legend of the colours underneath (LEGEND_HEIGHT more rows)."""
    picture = rgb.astype(np.float32)
    for cls, mask in zip(classes, masks, strict=True):
        colour = np.array(CLASS_COLOURS.get(cls, OTHER_COLOUR), np.float32)
        picture[mask] = (1 - OVERLAY_ALPHA) * picture[mask] + OVERLAY_ALPHA * colour
    filled = np.asarray(picture.round().astype(np.uint8))
    return with_legend(filled, tuple(classes), "fill: predicted lesion")


class ServerUnreachable(RuntimeError):
    """No Triton server answers at the URL: a problem of the call, not of a photograph."""


class TritonModel:
    """One model version on a Triton server, over HTTP or gRPC (tritonclient).

    A refused connection or an unavailable server becomes ServerUnreachable (one line, no
    traceback); other errors are Triton's own InferenceServerException.
    """

    def __init__(
        self, url: str, protocol: Protocol, name: str, version: str, timeout_s: float
    ) -> None:
        if protocol == "http":
            import tritonclient.http as client_module

            self._client = client_module.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            import tritonclient.grpc as client_module

            self._client = client_module.InferenceServerClient(url)
        self._module, self._protocol, self._url = client_module, protocol, url
        self._name, self._version, self._timeout_s = name, version, timeout_s

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        from tritonclient.utils import InferenceServerException

        try:
            yield
        except (OSError, InferenceServerException) as exc:
            unavailable = isinstance(exc, OSError) or "UNAVAILABLE" in str(exc.status())
            if not unavailable:
                raise
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ServerUnreachable(
                f"{self._url}: no Triton server answers over {self._protocol.upper()} "
                f"({reason.strip()}); start one (`drseg serve`) or pass --server HOST:PORT "
                f"and the --protocol it serves"
            ) from None

    def metadata(self) -> dict[str, Any]:
        with self._reaching():
            if self._protocol == "http":
                found: dict[str, Any] = self._client.get_model_metadata(self._name, self._version)
            else:
                found = self._client.get_model_metadata(self._name, self._version, as_json=True)
        return found

    def infer(self, input_name: str, array: Floats, output_name: str) -> Floats:
        request = self._module.InferInput(input_name, list(array.shape), "FP32")
        wanted = self._module.InferRequestedOutput(output_name)
        with self._reaching():
            if self._protocol == "http":
                request.set_data_from_numpy(array, binary_data=True)
                result = self._client.infer(
                    self._name, [request], model_version=self._version, outputs=[wanted]
                )
            else:
                request.set_data_from_numpy(array)
                result = self._client.infer(
                    self._name,
                    [request],
                    model_version=self._version,
                    outputs=[wanted],
                    client_timeout=self._timeout_s,
                )
        return np.asarray(result.as_numpy(output_name), np.float32)

    def close(self) -> None:
        self._client.close()


def served_versions(
    url: str, protocol: Protocol, model_name: str, timeout_s: float = 120.0
) -> list[int]:
    """The versions of `model_name` that the Triton server at `url` serves, ascending."""
    model = TritonModel(url, protocol, model_name, "", timeout_s)
    try:
        found = sorted(int(v) for v in model.metadata().get("versions") or [])
    finally:
        model.close()
    if not found:
        raise ValueError(
            f"{url}: Triton serves no version of {model_name!r}; check the server's log and "
            f"serve.model_name"
        )
    return found


def pinned_contract(model_file: Path, version: int | None = None) -> ServingContract:
    """The contract of `model_file`, naming the registry version it belongs to.

    `version` names it where the contract does not (an export made before registration,
    downloaded from the registry); where both do, they must agree.
    """
    contract = read_contract(Path(model_file))
    stored = contract.model_version
    if stored is not None and version is not None and stored != version:
        raise ValueError(
            f"{model_file}: its contract belongs to version {stored}, not {version}; pass "
            f"the model.onnx of version {version}"
        )
    if stored is None and version is None:
        raise ValueError(
            f"{model_file}: its contract names no model version, so the request cannot be "
            f"pinned to it; pass the model.onnx of a Triton repository written by "
            f"write_repository (it writes the version in), or the version"
        )
    return contract.model_copy(update={"model_version": stored or version})


def _check_served(
    model: TritonModel,
    served: list[int],
    contract: ServingContract,
    model_file: Path,
    url: str,
) -> None:
    """The server must serve the contract's version, with the contract's input, output and
    number of classes."""
    if contract.model_version not in served:
        raise ValueError(
            f"{url} serves versions {served}, not version {contract.model_version} whose "
            f"contract is {model_file}; predict with the contract of a served version "
            f"(--version {served[-1]}), or serve version {contract.model_version}"
        )
    metadata = model.metadata()
    inputs = {i["name"]: i for i in metadata.get("inputs", [])}
    outputs = {o["name"]: o for o in metadata.get("outputs", [])}
    problem = None
    if contract.input_name not in inputs:
        problem = f"no input {contract.input_name!r} (inputs: {sorted(inputs)})"
    elif contract.output_name not in outputs:
        problem = f"no output {contract.output_name!r} (outputs: {sorted(outputs)})"
    else:
        channels = int(outputs[contract.output_name]["shape"][1])
        if channels not in (-1, len(contract.classes)):
            problem = f"{channels} output channels, the contract {len(contract.classes)} classes"
    if problem:
        raise ValueError(
            f"served model {metadata.get('name')!r} version {contract.model_version}: "
            f"{problem}; pass the model.onnx of the served version instead of {model_file}"
        )


@dataclass(frozen=True)
class PhotoResult:
    photograph: Path
    folder: Path
    classes: dict[str, dict[str, Any]]
    infer_seconds: float
    """One request's round trip (send, inference, receive); 0 when skipped."""
    total_seconds: float
    """Preprocessing, round trip and writing the outputs."""
    skipped: bool = False
    """The folder already held this photograph's answer from the same model version."""


@dataclass(frozen=True)
class PhotoFailure:
    photograph: Path
    message: str
    """One line: the file, the problem and the fix."""


def _output_folders(photos: Sequence[Path], out_dir: Path) -> list[Path]:
    """One folder per photograph, named by its stem; checked before any request."""
    folders = [Path(out_dir) / Path(p).stem for p in photos]
    seen: dict[Path, Path] = {}
    for photo, folder in zip(photos, folders, strict=True):
        if folder in seen:
            raise ValueError(
                f"{photo} and {seen[folder]} would both write {folder}; rename one or "
                f"predict them into different out_dir"
            )
        seen[folder] = Path(photo)
    return folders


def _answered_before(folder: Path, photo: Path, model: dict[str, Any]) -> dict[str, Any] | None:
    """The classes of an earlier, complete answer for `photo` by the same model version."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    same = summary.get("photograph") == str(photo) and summary.get("model") == model
    return summary.get("classes") if same else None


def _write_outputs(
    folder: Path,
    prepared: PreparedPhotograph,
    masks: Masks,
    summary: dict[str, Any],
    contract: ServingContract,
) -> None:
    """Built beside `folder` and renamed into place; an older answer there is replaced."""
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.partial")
    with atomic.output_dir(staging) as work:
        picture = cv2.cvtColor(overlay(prepared.rgb, masks, contract.classes), cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".png", picture, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise OSError(f"{folder / OVERLAY_FILE}: PNG encoding failed")
        atomic.write_bytes(work / OVERLAY_FILE, encoded.tobytes())
        for cls, mask in zip(contract.classes, masks, strict=True):
            dataset.write_mask(work / f"mask_{cls}.png", mask)
        dataset.write_json(work / SUMMARY_FILE, summary)
    try:
        if folder.exists():
            replaced = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.replaced")
            folder.rename(replaced)
            shutil.rmtree(replaced)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _predict_one(
    model: TritonModel,
    photo: Path,
    folder: Path,
    contract: ServingContract,
    model_info: dict[str, Any],
    max_pixels: int,
) -> PhotoResult:
    started = time.perf_counter()
    earlier = _answered_before(folder, photo, model_info)
    if earlier is not None:
        return PhotoResult(photo, folder, earlier, 0.0, 0.0, skipped=True)
    prepared = prepare_photograph(photo, contract, max_pixels)
    sent = time.perf_counter()
    output = model.infer(contract.input_name, prepared.model_input[None], contract.output_name)
    infer_seconds = time.perf_counter() - sent
    masks = served_masks(output, prepared, contract)
    height, width = prepared.fov.shape
    classes = lesion_summary(masks, prepared.fov, contract)
    source_w, source_h = prepared.source_size
    summary = {
        "photograph": str(photo),
        "source_size": [source_w, source_h],
        "working_size": [width, height],
        "source_pixels_per_pixel": (source_w * source_h) / (width * height),
        "model": model_info,
        "fov_pixels": int(prepared.fov.sum()),
        "classes": classes,
    }
    _write_outputs(folder, prepared, masks, summary, contract)
    total = time.perf_counter() - started
    return PhotoResult(photo, folder, classes, infer_seconds, total)


def predict(
    photos: Sequence[Path],
    server_url: str,
    protocol: Protocol,
    out_dir: Path,
    model_file: Path,
    model_name: str = "drseg",
    timeout_s: float = 120.0,
    max_pixels: int = MAX_PIXELS,
    version: int | None = None,
) -> Iterator[PhotoResult | PhotoFailure]:
    """Segment each photograph on the Triton server at `server_url` (host:port of its HTTP
    or gRPC endpoint) and write its outputs, yielding one outcome per photograph as it ends.

    `model_file` is the served version's model.onnx: its contract is applied and the request
    is pinned to its version (`version` names it where the contract does not), which the
    server must serve. A photograph that cannot be read, or that the server refuses, is a
    PhotoFailure and the next one goes on; a problem of the whole call (the contract, the
    output folders, an unreachable server) raises before or instead of the outcomes.
    `max_pixels` is ingest.max_pixels: larger photographs are refused from their header.
    """
    from tritonclient.utils import InferenceServerException

    contract = pinned_contract(Path(model_file), version)
    folders = _output_folders(photos, Path(out_dir))
    url = server_url.split("://")[-1]
    model = TritonModel(url, protocol, model_name, str(contract.model_version), timeout_s)
    try:
        served = served_versions(url, protocol, model_name, timeout_s)
        _check_served(model, served, contract, Path(model_file), url)
        model_info = {
            "name": model_name,
            "version": contract.model_version,
            "encoder": contract.encoder,
            "dataset_hash": contract.dataset_hash,
        }
        for photo, folder in zip(photos, folders, strict=True):
            try:
                yield _predict_one(model, Path(photo), folder, contract, model_info, max_pixels)
            except (ValueError, OSError, InferenceServerException) as exc:
                message = exc.message() if isinstance(exc, InferenceServerException) else exc
                yield PhotoFailure(Path(photo), _one_line(f"{message}", Path(photo)))
    finally:
        model.close()


def _one_line(message: str, photo: Path) -> str:
    """The message on one line, starting with the photograph's path."""
    text = " ".join(message.split())
    return text if text.startswith(str(photo)) else f"{photo}: {text}"
