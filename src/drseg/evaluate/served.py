"""The exported graph, run as it is served: what the gate scores.

`drseg predict` turns a photograph into the graph's input with the client's functions
(drseg.serving.client.prepare_photograph: decode, resize to the working width, field of
view, CLAHE, normalisation, padding), sends the whole image in one request, and thresholds
the answer inside the field of view (lesion_masks). This module does exactly that, by the
same functions, with ONNX Runtime in place of the Triton round trip (Triton runs the same
graph with the same runtime), so the numbers the gate reads are those of the served model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drseg.contract import ServingContract, read_contract
from drseg.evaluate.metrics import dice_iou
from drseg.serving.client import Floats, Masks, lesion_masks, prepare_photograph

Runner = Callable[[Floats], Floats]
"""(N, 3, H, W) model input -> (N, C, H, W) probabilities: ONNX Runtime, or a TensorRT plan."""

SCORED = "the exported graph in ONNX Runtime, whole photographs as `drseg predict` sends them"
"""What produced the probabilities; recorded in metrics.json (a champion's metrics are only
comparable when scored the same way)."""


def onnx_runner(onnx_path: Path, contract: ServingContract) -> Runner:
    """The graph in ONNX Runtime on the CPU (the runtime Triton's ONNX backend uses)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def run(batch: Floats) -> Floats:
        output = session.run([contract.output_name], {contract.input_name: batch})[0]
        return np.asarray(output, np.float32)

    return run


def check_photographs(dataset_dir: Path, contract: ServingContract, graph: Path) -> None:
    """The dataset must hold what `drseg predict` is sent, at the graph's working width:
    the ingest-stage photographs (the client applies CLAHE itself; a CLAHE-stage photograph
    would get it twice), resized as the client resizes (or masks and truth would not match
    pixel for pixel)."""
    from drseg.data.dataset import load_manifest

    params = load_manifest(dataset_dir).params
    if "clahe" in params:
        raise ValueError(
            f"{dataset_dir}: a CLAHE-stage dataset; pass the ingest-stage dataset (its "
            f"photographs are what `drseg predict` is sent: the served path applies CLAHE itself)"
        )
    if params.get("working_width") != contract.working_width:
        raise ValueError(
            f"{dataset_dir}: photographs at working width {params.get('working_width')}, but "
            f"{graph} serves {contract.working_width}; evaluate on the ingest-stage dataset "
            f"the model was trained from"
        )


class ServedGraph:
    """One exported model.onnx and its serving contract, run by `runner` (default: ONNX
    Runtime on the CPU; a TensorRT plan built from the graph, to check it)."""

    def __init__(self, onnx_path: Path, runner: Runner | None = None) -> None:
        self.path = Path(onnx_path)
        self.contract: ServingContract = read_contract(self.path)
        self.classes = self.contract.classes
        self._run = runner or onnx_runner(self.path, self.contract)

    def probabilities(self, photograph: Path) -> tuple[Floats, Masks]:
        """(C, H, W) probabilities at the working size and the client's field of view."""
        prepared = prepare_photograph(Path(photograph), self.contract)
        output = self._run(prepared.model_input[None])
        height, width = prepared.fov.shape
        return np.asarray(output[0, :, :height, :width], np.float32), prepared.fov

    def masks(self, probabilities: Floats, fov: Masks, thresholds: dict[str, float]) -> Masks:
        """The client's thresholding (lesion_masks), at `thresholds` instead of the
        contract's: cross-fitting scores each fold at thresholds tuned on the others."""
        contract = self.contract.model_copy(update={"thresholds": thresholds})
        return lesion_masks(probabilities, fov, contract)


@dataclass(frozen=True)
class Agreement:
    """How far another runtime's masks agree with the graph's, per class."""

    dice: dict[str, float]
    """Per class: Dice of the candidate's masks against the graph's, pooled over the
    photographs; 1.0 where both leave the class empty (the same answer)."""
    minimum: float
    photographs: int

    @property
    def passed(self) -> bool:
        return min(self.dice.values()) >= self.minimum

    def describe(self) -> str:
        shown = ", ".join(f"{cls} {value:.4f}" for cls, value in self.dice.items())
        verdict = "agrees" if self.passed else "DISAGREES"
        return (
            f"{verdict} with the ONNX graph on {self.photographs} validation photographs "
            f"(mask Dice per class: {shown}; required >= {self.minimum})"
        )


def mask_agreement(
    reference: ServedGraph, candidate: ServedGraph, photographs: Sequence[Path], minimum: float
) -> Agreement:
    """Per-class mask agreement of `candidate` (e.g. the FP16 TensorRT plan) with
    `reference` (the graph the gate scored), both thresholded by the reference's contract."""
    if not photographs:
        raise ValueError("no photographs to compare the runtimes on; pass the validation split")
    thresholds = reference.contract.thresholds
    counts = np.zeros((len(reference.classes), 3), np.int64)
    for photo in photographs:
        probs, fov = reference.probabilities(photo)
        theirs, _ = candidate.probabilities(photo)
        ours = reference.masks(probs, fov, thresholds)
        other = reference.masks(theirs, fov, thresholds)
        for c in range(len(reference.classes)):
            tp = int(np.count_nonzero(ours[c] & other[c]))
            counts[c] += (tp, int(np.count_nonzero(other[c])) - tp, int(ours[c].sum()) - tp)
    dice = {
        cls: dice_iou(int(tp), int(fp), int(fn), empty=1.0)[0]
        for cls, (tp, fp, fn) in zip(reference.classes, counts, strict=True)
    }
    return Agreement(dice, minimum, len(photographs))
