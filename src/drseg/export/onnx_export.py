"""Export a trained model folder to ONNX, with its preprocessing contract inside the file.

The graph takes ``image``: (batch, 3, height, width) float32, normalised as in training,
height and width multiples of 32 (the encoder's stride; other sizes run but make the
decoder resize feature maps, which training never did). It returns ``probabilities``:
(batch, classes, height, width), the sigmoid already applied, and optionally
``reconstruction``: (batch, 3, height, width). Batch, height and width are dynamic.

Everything a client needs to turn a photograph into that input and the output into masks
(working width, CLAHE, normalisation, classes, tuned thresholds) is the `ServingContract`
(drseg.contract), stored in the ONNX metadata. The Triton repository carries the file and
serving reads it from there.

The legacy TorchScript exporter is used (``dynamo=False``): 1-2 s for a U-Net, against
~8 s and an extra package (onnxscript) for the dynamo one, with the same graph.

torch is imported inside the export functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx

from drseg import atomic
from drseg.artifacts import WEIGHTS_FILE, ModelCard
from drseg.config import SIZE_MULTIPLE, ClaheSettings, ExportSettings, IngestSettings
from drseg.contract import (
    CONTRACT_KEY,
    INPUT_NAME,
    OUTPUT_NAME,
    RECONSTRUCTION_NAME,
    ServingContract,
    pad_to_multiple,
)

if TYPE_CHECKING:
    import torch

TRACE_SHAPE = (1, 3, 64, 64)
"""Shape the graph is traced with; the parity inputs use other shapes, so a size frozen
into the graph by mistake shows up as a failed check instead of a wrong served output."""

PARITY_SHAPES = ((2, 3, 64, 96), (1, 3, 96, 128))
"""Random inputs of the parity check: batch > 1 and non-square, both unlike TRACE_SHAPE."""


UNTUNED_THRESHOLD = 0.5
"""Every class's threshold in a fresh export: evaluation tunes them on the exported graph's
own outputs and stamps them into the contract (with_thresholds) before anything serves it."""


def _check_dataset_preprocessing(
    dataset_dir: Path, ingest: IngestSettings, clahe: ClaheSettings
) -> None:
    """The contract comes from the settings; a dataset given for the parity check must have
    been made with the same ones, or the contract would describe other inputs."""
    from drseg.data.dataset import load_manifest

    params = load_manifest(dataset_dir).params
    if "clahe" not in params:
        raise ValueError(
            f"{dataset_dir}: an ingest-stage dataset (no CLAHE in its manifest); pass the "
            f"CLAHE-stage dataset the model was trained on"
        )
    made_with = {
        "ingest.working_width": params.get("working_width"),
        "clahe.clip_limit": params["clahe"].get("clip_limit"),
        "clahe.tile_grid": params["clahe"].get("tile_grid"),
    }
    settings = {
        "ingest.working_width": ingest.working_width,
        "clahe.clip_limit": clahe.clip_limit,
        "clahe.tile_grid": clahe.tile_grid,
    }
    differ = {k: (made_with[k], v) for k, v in settings.items() if made_with[k] != v}
    if differ:
        shown = ", ".join(f"{k}: dataset {a}, settings {b}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{dataset_dir}: the dataset was not made with these settings ({shown}); pass "
            f"the CLAHE-stage dataset the model was trained on, or settings that match it"
        )


def _sample_photograph(dataset_dir: Path) -> tuple[str, npt.NDArray[np.float32]]:
    """One photograph of the dataset (the first by id), as a padded (1, 3, H, W) input."""
    from drseg.data import dataset
    from drseg.models.normalize import image_to_tensor

    manifest = dataset.load_manifest(dataset_dir)
    if not manifest.records:
        raise ValueError(f"{dataset_dir}: the dataset has no records; pass a non-empty one")
    record = manifest.records[0]
    rgb = dataset.read_rgb(dataset.image_path(Path(dataset_dir), record.id))
    image = pad_to_multiple(image_to_tensor(rgb).numpy(), SIZE_MULTIPLE)
    return record.id, image[None]


def _serving_module(network: torch.nn.Module, reconstruction: bool) -> torch.nn.Module:
    """The network with the sigmoid inside and only the outputs that are served, in eval
    mode (BatchNorm on running statistics); torch.onnx.export restores that mode after
    tracing, so the parity check runs the same module."""
    import torch

    class Served(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits, recon = self.network(x)
            if reconstruction and recon is not None:
                return torch.sigmoid(logits), recon
            return (torch.sigmoid(logits),)

    return Served().eval()


def _trace_to_onnx(module: torch.nn.Module, output_names: list[str], opset: int) -> bytes:
    import torch

    dynamic = {0: "batch", 2: "height", 3: "width"}
    with tempfile.TemporaryDirectory(prefix="drseg-export-") as tmp, warnings.catch_warnings():
        # Expected and chosen: the legacy exporter announces its own deprecation.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            (torch.zeros(TRACE_SHAPE),),
            path,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes={name: dynamic for name in [INPUT_NAME, *output_names]},
            opset_version=opset,
            dynamo=False,
        )
        return path.read_bytes()


@dataclass(frozen=True)
class ParityCheck:
    input: str
    """"random" or "photograph <record id>"."""
    shape: tuple[int, ...]
    max_abs_diff: float


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance."""


def check_parity(
    graph: bytes,
    module: torch.nn.Module,
    inputs: Sequence[tuple[str, npt.NDArray[np.float32]]],
    tolerance: float,
    source: str,
) -> tuple[ParityCheck, ...]:
    """Run each named input through ONNX Runtime and `module`; every output must agree
    within `tolerance` (max abs difference), else ParityError with all the numbers."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    checks = []
    for name, array in inputs:
        with torch.no_grad():
            expected = [t.numpy() for t in module(torch.from_numpy(array))]
        got = session.run(None, {INPUT_NAME: array})
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
        checks.append(ParityCheck(name, tuple(array.shape), diff))
    failed = [c for c in checks if not c.max_abs_diff <= tolerance]
    if failed:
        shown = "; ".join(f"{c.input} {c.shape}: {c.max_abs_diff:.3g}" for c in checks)
        raise ParityError(
            f"{source}: ONNX Runtime differs from PyTorch by more than {tolerance:g} "
            f"(max abs difference per input: {shown}); nothing was written. Check for "
            f"operations the exporter traces as constants, or raise export.parity_tolerance "
            f"only if the difference is understood"
        )
    return tuple(checks)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    contract: ServingContract
    parity: tuple[ParityCheck, ...]
    seconds: float
    """Export alone (trace and serialise), without the parity check."""
    size_bytes: int


def _with_metadata(graph: bytes, contract: ServingContract) -> bytes:
    proto = onnx.load_from_string(graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONTRACT_KEY, contract.to_json()
    proto.doc_string = (
        f"drseg lesion segmentation ({contract.encoder} U-Net): {INPUT_NAME} (N,3,H,W) "
        f"normalised, H and W multiples of {SIZE_MULTIPLE} -> {OUTPUT_NAME} "
        f"(N,{len(contract.classes)},H,W); preprocessing in metadata {CONTRACT_KEY!r}"
    )
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def export_onnx(
    model_dir: Path,
    thresholds: Mapping[str, float] | None,
    out_path: Path,
    settings: ExportSettings,
    ingest: IngestSettings,
    clahe: ClaheSettings,
    dataset_dir: Path | None = None,
    model_version: int | None = None,
) -> ExportResult:
    """Export `model_dir` (model.pt + model.json) to `out_path`, written atomically and only
    after the parity check passes.

    The contract takes its preprocessing from `ingest` and `clahe` (the settings the
    training data was made with) and its thresholds from `thresholds` (None: every class at
    UNTUNED_THRESHOLD, until evaluation stamps tuned ones in). With `dataset_dir`
    (the CLAHE-stage dataset) those settings are checked against the dataset's manifest and
    its first photograph joins the random inputs of the parity check.
    """
    from drseg.models.normalize import IMAGE_MEAN, IMAGE_STD
    from drseg.models.unet import load_trained_model

    model_dir, out_path = Path(model_dir), Path(out_path)
    card = ModelCard.read(model_dir)
    classes = card.model.classes
    chosen = dict.fromkeys(classes, UNTUNED_THRESHOLD) if thresholds is None else dict(thresholds)
    if dataset_dir is not None:
        _check_dataset_preprocessing(Path(dataset_dir), ingest, clahe)
    network = load_trained_model(model_dir / WEIGHTS_FILE, card.model)
    if settings.reconstruction and network.reconstruction_head is None:
        raise ValueError(
            f"{model_dir}: export.reconstruction is on but the model has no reconstruction "
            f"head (model.reconstruction_weight was 0); turn export.reconstruction off"
        )
    contract = ServingContract(
        reconstruction_name=RECONSTRUCTION_NAME if settings.reconstruction else None,
        working_width=ingest.working_width,
        clahe_clip_limit=clahe.clip_limit,
        clahe_tile_grid=clahe.tile_grid,
        mean=IMAGE_MEAN,
        std=IMAGE_STD,
        classes=card.model.classes,
        thresholds=chosen,
        encoder=card.model.encoder,
        dataset_hash=card.dataset_hash,
        model_version=model_version,
    )
    module = _serving_module(network, settings.reconstruction)
    output_names = [OUTPUT_NAME, *([RECONSTRUCTION_NAME] if settings.reconstruction else [])]
    started = time.perf_counter()
    graph = _with_metadata(_trace_to_onnx(module, output_names, settings.opset), contract)
    seconds = time.perf_counter() - started

    rng = np.random.default_rng(0)
    inputs = [("random", rng.standard_normal(s).astype(np.float32)) for s in PARITY_SHAPES]
    if dataset_dir is not None:
        record_id, photograph = _sample_photograph(Path(dataset_dir))
        inputs.append((f"photograph {record_id}", photograph))
    parity = check_parity(graph, module, inputs, settings.parity_tolerance, str(model_dir))
    atomic.write_bytes(out_path, graph)
    return ExportResult(out_path, contract, parity, seconds, len(graph))


def with_thresholds(onnx_path: Path, thresholds: Mapping[str, float], out_path: Path) -> Path:
    """A copy of an exported graph whose contract ships `thresholds`; the graph itself (and
    so every probability) is unchanged, only the contract in its metadata differs."""
    proto = onnx.load(str(onnx_path))
    entries = {p.key: p for p in proto.metadata_props}
    if CONTRACT_KEY not in entries:
        raise ValueError(
            f"{onnx_path}: no {CONTRACT_KEY!r} metadata, so not exported by drseg; export the "
            f"model folder with drseg.export.onnx_export.export_onnx"
        )
    contract = ServingContract.from_json(entries[CONTRACT_KEY].value, str(onnx_path))
    updated = ServingContract.model_validate(
        {**contract.model_dump(), "thresholds": dict(thresholds)}
    )
    entries[CONTRACT_KEY].value = updated.to_json()
    atomic.write_bytes(Path(out_path), proto.SerializeToString())
    return Path(out_path)


def export_summary(result: ExportResult) -> dict[str, Any]:
    """The figures of an export, as plain JSON values (for logs and step summaries)."""
    return {
        "onnx": str(result.path),
        "size_bytes": result.size_bytes,
        "export_seconds": round(result.seconds, 3),
        "parity_max_abs_diff": max(c.max_abs_diff for c in result.parity),
        "parity": [
            {"input": c.input, "shape": list(c.shape), "max_abs_diff": c.max_abs_diff}
            for c in result.parity
        ],
        "contract": json.loads(result.contract.to_json()),
    }
