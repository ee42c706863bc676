"""The exported graph, run as it is served: what the gate scores.

`drseg predict` turns a photograph into the graph's input with the client's functions
(drseg.serving.client.prepare_photograph: decode, resize to the working width, field of
view, CLAHE, normalisation, padding), sends the whole image in one request, and thresholds
the answer inside the field of view (lesion_masks). This module does exactly that, by the
same functions, with ONNX Runtime in place of the Triton round trip (Triton runs the same
graph with the same runtime), so the numbers the gate reads are those of the served model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from drseg.contract import ServingContract, read_contract
from drseg.serving.client import Floats, Masks, lesion_masks, prepare_photograph

SCORED = "the exported graph in ONNX Runtime, whole photographs as `drseg predict` sends them"
"""What produced the probabilities; recorded in metrics.json (a champion's metrics are only
comparable when scored the same way)."""


class ServedGraph:
    """One exported model.onnx and its serving contract, run on the CPU."""

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        self.contract: ServingContract = read_contract(self.path)
        self.classes = self.contract.classes
        self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])

    def probabilities(self, photograph: Path) -> tuple[Floats, Masks]:
        """(C, H, W) probabilities at the working size and the client's field of view."""
        prepared = prepare_photograph(Path(photograph), self.contract)
        output = self._session.run(
            [self.contract.output_name], {self.contract.input_name: prepared.model_input[None]}
        )[0]
        height, width = prepared.fov.shape
        return np.asarray(output[0, :, :height, :width], np.float32), prepared.fov

    def masks(self, probabilities: Floats, fov: Masks, thresholds: dict[str, float]) -> Masks:
        """The client's thresholding (lesion_masks), at `thresholds` instead of the
        contract's: cross-fitting scores each fold at thresholds tuned on the others."""
        contract = self.contract.model_copy(update={"thresholds": thresholds})
        return lesion_masks(probabilities, fov, contract)
