"""The files of drseg's output folders, and the model card, in one place.

A model folder (the fine-tune output) holds ``model.pt`` (state dict of the MultiTaskUNet),
``model.json`` (the model card: model and training settings, dataset hash, steps, encoder
init) and ``checkpoints/`` (Lightning checkpoints, for resuming). A pretrain folder holds
``encoder.pt`` or, when pretraining is off, the ``skipped`` marker. An export folder holds
``model.onnx``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from drseg.config import FinetuneSettings, ModelSettings

WEIGHTS_FILE = "model.pt"
MODEL_CARD = "model.json"
ONNX_FILE = "model.onnx"
ENCODER_FILE = "encoder.pt"
SKIPPED = "skipped"
"""Marker file of a pretrain output folder when pretraining is off (pretrain.enabled false)."""


@dataclass(frozen=True)
class ModelCard:
    model: ModelSettings
    finetune: FinetuneSettings
    dataset_hash: str
    steps: int
    encoder_init: str = "random"
    """"random", or the sha256 of the encoder weights file fine-tuning started from."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": json.loads(self.model.model_dump_json()),
                "finetune": json.loads(self.finetune.model_dump_json()),
                "dataset_hash": self.dataset_hash,
                "steps": self.steps,
                "encoder_init": self.encoder_init,
            },
            indent=2,
        )

    @classmethod
    def read(cls, model_dir: Path) -> ModelCard:
        path = Path(model_dir) / MODEL_CARD
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir}: not a drseg model folder (no {MODEL_CARD}); "
                "create one with `drseg finetune`"
            )
        data = json.loads(path.read_text())
        return cls(
            ModelSettings.model_validate(data["model"]),
            FinetuneSettings.model_validate(data["finetune"]),
            data["dataset_hash"],
            data["steps"],
            data.get("encoder_init", "random"),
        )
