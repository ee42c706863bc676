"""Helpers shared by the export and serving tests: a tiny untrained model folder, the
thresholds to export it with, and a small CLAHE-stage dataset.

Random weights are enough: export parity and serving plumbing do not depend on training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from drseg.artifacts import ModelCard
from drseg.config import (
    LESION_CLASSES,
    ClaheSettings,
    FinetuneSettings,
    IngestSettings,
    ModelSettings,
)
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.models.unet import build_model

THRESHOLDS = {"MA": 0.3, "HE": 0.4, "EX": 0.5, "SE": 0.6}
WORKING_WIDTH = 192
INGEST = IngestSettings(working_width=WORKING_WIDTH, workers=1)
CLAHE = ClaheSettings(workers=1)


def write_tiny_model(folder: Path, reconstruction: bool = True, seed: int = 0) -> ModelSettings:
    """model.pt (resnet18 U-Net, random weights from `seed`) and model.json, as finetune
    writes them.

    The segmentation bias is zeroed (training starts it at a 1% lesion prior), so the
    probabilities spread around 0.5 and thresholded masks are neither empty nor full.
    """
    torch.manual_seed(seed)
    settings = ModelSettings(
        encoder="resnet18", classes=LESION_CLASSES, reconstruction_weight=0.1 * reconstruction
    )
    network = build_model(settings)
    torch.nn.init.zeros_(network.unet.segmentation_head[0].bias)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), folder / "model.pt")
    card = ModelCard(settings, FinetuneSettings(), dataset_hash="d" * 64, steps=0)
    (folder / "model.json").write_text(card.to_json())
    return settings


def clahe_dataset_from(source: Path, work: Path) -> Path:
    """Ingest `source` at WORKING_WIDTH and CLAHE it, as the pipeline does before training."""
    ingest(source, work / "ingested", INGEST)
    clahe_dataset(work / "ingested", work / "clahe", CLAHE)
    return work / "clahe"
