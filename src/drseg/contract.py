"""The serving contract: how a photograph becomes the exported graph's input and its output
becomes lesion masks (working width, CLAHE, normalisation, classes, thresholds, version).

It is stored as JSON in the ONNX metadata under ``drseg_contract``; the exported file is the
one place it lives, and serving, the client and the canary probe read it from there. This
module needs neither torch nor the exporter, so a client pays neither's import time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drseg.config import SIZE_MULTIPLE

CONTRACT_KEY = "drseg_contract"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
RECONSTRUCTION_NAME = "reconstruction"
CONTRACT_FORMAT = 1


class ServingContract(BaseModel):
    """How a photograph becomes the graph's input and its output becomes lesion masks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = CONTRACT_FORMAT
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    reconstruction_name: str | None = None
    """Name of the reconstruction output, None when the graph has none."""
    size_multiple: int = SIZE_MULTIPLE
    """Height and width of the input must be multiples of this; pad (edge) to reach it."""
    working_width: int = Field(ge=1)
    """Resize the photograph to this width, aspect ratio kept (drseg.preprocess)."""
    clahe_clip_limit: float = Field(gt=0.0)
    clahe_tile_grid: int = Field(ge=1)
    mean: tuple[float, float, float]
    """Per RGB channel, on 0..1 values: input = (rgb / 255 - mean) / std."""
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    """Output channels, in order."""
    thresholds: dict[str, float]
    """Per class: a pixel is lesion when its probability is >= this (tuned by evaluate)."""
    encoder: str
    dataset_hash: str
    """The dataset the model was fine-tuned on."""
    model_version: int | None = None
    """Registry version, when the export was made for a registered model."""

    @model_validator(mode="after")
    def _thresholds_per_class(self) -> ServingContract:
        if set(self.thresholds) != set(self.classes):
            raise ValueError(
                f"thresholds are given for {sorted(self.thresholds)} but the classes are "
                f"{list(self.classes)}; give exactly one threshold per class"
            )
        outside = {c: t for c, t in self.thresholds.items() if not 0.0 <= t <= 1.0}
        if outside:
            raise ValueError(f"thresholds {outside} are outside [0, 1]; use probabilities")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str, source: str) -> ServingContract:
        """Parse a contract; `source` (a file) is named in the error."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(
                f"{source}: invalid serving contract ({exc}); re-export the model with "
                f"this version of drseg"
            ) from exc


def read_contract(onnx_path: Path) -> ServingContract:
    """The contract stored in an exported ONNX file."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(
            f"{onnx_path}: ONNX file not found; pass the model.onnx that `export_onnx` wrote "
            f"(in a Triton repository: <repo>/<model>/<version>/model.onnx)"
        )
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{onnx_path}: not a readable ONNX file ({exc}); re-export it") from exc
    for prop in proto.metadata_props:
        if prop.key == CONTRACT_KEY:
            return ServingContract.from_json(prop.value, str(onnx_path))
    raise ValueError(
        f"{onnx_path}: no {CONTRACT_KEY!r} metadata, so not exported by drseg; export the "
        f"model folder with drseg.export.onnx_export.export_onnx"
    )


def pad_to_multiple(image: npt.NDArray[np.float32], multiple: int) -> npt.NDArray[np.float32]:
    """(C, H, W) -> (C, H', W'), H' and W' the next multiples, padded at the bottom and right
    by repeating the edge pixels, as tiled evaluation pads (the fundus's black surround
    continues)."""
    _, height, width = image.shape
    extra_h, extra_w = -height % multiple, -width % multiple
    if not (extra_h or extra_w):
        return image
    return np.pad(image, ((0, 0), (0, extra_h), (0, extra_w)), mode="edge")
