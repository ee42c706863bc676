"""metrics.json, typed: the one model the evaluate stage writes and the gate, the registry,
the export, the steps, the pipeline components and `drseg run` read.

An undefined number (NaN: a Dice with nothing to find and nothing found, an AUPR without a
lesion pixel) is stored as null and read back as None, never as a score; the gate fails a
rule that reads one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drseg import atomic

METRICS_FILE = "metrics.json"
METRICS_FORMAT = 2
"""Bump when a field changes meaning; a file of another format is refused, not misread."""

Number = float | None
"""A score, or None where it is undefined."""


def defined(value: float) -> Number:
    """NaN -> None, so the JSON is valid and undefined values read as null."""
    return None if math.isnan(value) else float(value)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassMetrics(_Frozen):
    aupr: Number
    """Area under the split's precision-recall curve; threshold-free."""
    dice: Number
    """Dataset-level Dice at the scored thresholds (cross-fitted: see Metrics.thresholds)."""
    iou: Number
    threshold: float = Field(ge=0.0, le=1.0)
    """The threshold shipped in the serving contract (tuned on the whole split, or given)."""
    fold_thresholds: tuple[float, ...] = ()
    """Cross-fitting: the threshold each fold was scored at (tuned on the other folds)."""
    per_image_dice_mean: Number
    images_with_lesion: int = Field(ge=0)
    images_excluded_empty: int = Field(ge=0)
    """Images without a lesion of the class (not in the per-image mean)."""
    images_empty_both: int = Field(0, ge=0)
    """Images where neither the truth nor the prediction has the class: Dice undefined."""
    lesion_pixels: int = Field(ge=0)
    idrid_best_aupr: Number = None


class MergedMetrics(_Frozen):
    dice: Number
    """Dice of the any-lesion mask (union over classes), dataset-level."""


class Metrics(_Frozen):
    format: int = METRICS_FORMAT
    split: str
    images: int = Field(ge=0)
    dataset_hash: str
    """Content hash of the dataset whose photographs were scored."""
    scored: str
    """What produced the probabilities (e.g. the exported graph, as served)."""
    model_version: int | None = None
    """Registry version of the scored model (the @champion's), None for a new model."""
    thresholds: Literal["cross_fitted", "given"]
    """cross_fitted: each fold scored at thresholds tuned on the others; given: fixed."""
    folds: int = Field(ge=1)
    classes: dict[str, ClassMetrics]
    mean_aupr: Number
    merged: MergedMetrics
    notes: tuple[str, ...] = ()

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != METRICS_FORMAT:
            raise ValueError(f"metrics format {value}, this drseg reads {METRICS_FORMAT}")
        return value

    def shipped_thresholds(self) -> dict[str, float]:
        return {cls: m.threshold for cls, m in self.classes.items()}

    def scalars(self) -> dict[str, float]:
        """{"MA.aupr": 0.41, ..., "merged.dice": 0.83}: the defined numbers, for MLflow and
        KFP metrics."""
        flat = {}
        for cls, values in self.classes.items():
            for name in ("aupr", "dice", "iou", "threshold", "per_image_dice_mean"):
                value = getattr(values, name)
                if value is not None:
                    flat[f"{cls}.{name}"] = float(value)
        if self.merged.dice is not None:
            flat["merged.dice"] = self.merged.dice
        return flat

    def to_json(self) -> str:
        return json.dumps(json.loads(self.model_dump_json()), indent=2, allow_nan=False) + "\n"

    def write(self, path: Path) -> Path:
        atomic.write_text(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def from_json(cls, text: str, source: str) -> Metrics:
        """Parse metrics; `source` (a file or a registry tag) is named in the error."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(
                f"{source}: not a drseg metrics.json of format {METRICS_FORMAT} ({exc}); "
                f"pass the metrics.json the evaluate stage of this drseg wrote"
            ) from exc

    @classmethod
    def read(cls, path: Path) -> Metrics:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: metrics file not found; pass the metrics.json the evaluate stage "
                f"wrote (in its output folder)"
            )
        return cls.from_json(path.read_text(), str(path))
