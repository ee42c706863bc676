"""The training and evaluation steps as the pipeline runs them: library call + tracking +
the files of the output artifact. KFP components and `drseg <verb>` both call these.

A model folder (the fine-tune output) holds ``model.pt`` (state dict of the
MultiTaskUNet), ``model.json`` (model and training settings, dataset hash, steps) and
``checkpoints/`` (Lightning checkpoints, for resuming).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drseg import atomic
from drseg.config import (
    EvaluateSettings,
    FinetuneSettings,
    ModelSettings,
    TrackingSettings,
)

MODEL_CARD = "model.json"


@dataclass(frozen=True)
class ModelCard:
    model: ModelSettings
    finetune: FinetuneSettings
    dataset_hash: str
    steps: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": json.loads(self.model.model_dump_json()),
                "finetune": json.loads(self.finetune.model_dump_json()),
                "dataset_hash": self.dataset_hash,
                "steps": self.steps,
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
        )


def finetune_step(
    dataset_dir: Path,
    model_dir: Path,
    model: ModelSettings,
    settings: FinetuneSettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
) -> dict[str, Any]:
    """Train, track, and write the model folder; returns the figures for the summary."""
    from drseg.data.dataset import load_manifest
    from drseg.tracking import stage_run
    from drseg.train.finetune import finetune

    dataset_hash = load_manifest(dataset_dir).dataset_hash
    config = {"model": model, "finetune": settings}
    with stage_run(
        tracking,
        home,
        "finetune",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=dataset_hash,
        config=config,
    ) as run:
        result = finetune(dataset_dir, model_dir, model, settings, run.metric_logger())
        card = ModelCard(model, settings, dataset_hash, result.steps)
        atomic.write_text(Path(model_dir) / MODEL_CARD, card.to_json())
        figures = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "seconds": result.seconds,
            "images_per_second": result.images_per_second,
        }
        run.log_metrics(figures)
        run.log_artifact(Path(model_dir) / MODEL_CARD)
    return {**figures, "weights": str(result.weights), "mlflow_run_id": run.run_id}


@dataclass(frozen=True)
class EvaluateOutcome:
    metrics: dict[str, Any]
    scalars: dict[str, float]
    """metrics.json flattened: {"MA.aupr": 0.41, ..., "merged.dice": 0.83}."""
    report: Path
    mlflow_run_id: str


def evaluate_step(
    model_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    settings: EvaluateSettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
    split: str = "val",
) -> EvaluateOutcome:
    """Tiled inference on a split, metrics and plots, tuned thresholds; all tracked."""
    import torch

    from drseg.data.dataset import load_manifest
    from drseg.evaluate.report import evaluate_dataset
    from drseg.tracking import stage_run
    from drseg.train.finetune import load_trained_model

    card = ModelCard.read(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network = load_trained_model(Path(model_dir) / "model.pt", card.model, device)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return network(batch)[0]

    with stage_run(
        tracking,
        home,
        "evaluate",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=load_manifest(dataset_dir).dataset_hash,
        config={"evaluate": settings, "split": split},
    ) as run:
        result = evaluate_dataset(
            logits, dataset_dir, out_dir, card.model.classes, settings, split=split, device=device
        )
        scalars = _flat_metrics(result.metrics)
        run.log_metrics(scalars)
        run.log_artifact(Path(out_dir))
    return EvaluateOutcome(result.metrics, scalars, result.report_path, run.run_id)


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json -> {"MA.aupr": 0.41, ..., "merged.dice": 0.83}; undefined values dropped."""
    groups = {**metrics["classes"], "merged": metrics["merged"]}
    return {
        f"{group}.{name}": float(value)
        for group, values in groups.items()
        for name, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
