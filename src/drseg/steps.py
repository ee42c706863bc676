"""The training and evaluation steps as the pipeline runs them: library call + tracking +
the files of the output artifact. KFP components and `drseg <verb>` both call these.

What the output folders hold, and the model card, are in drseg.artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from drseg import atomic
from drseg.artifacts import ENCODER_FILE, MODEL_CARD, ONNX_FILE, SKIPPED, WEIGHTS_FILE, ModelCard
from drseg.config import (
    ClaheSettings,
    EvaluateSettings,
    ExportSettings,
    FinetuneSettings,
    GateSettings,
    IngestSettings,
    ModelSettings,
    PretrainSettings,
    RegistrySettings,
    ServeSettings,
    TrackingSettings,
)


class _TrainingResult(Protocol):
    @property
    def steps(self) -> int: ...
    @property
    def final_loss(self) -> float: ...
    @property
    def seconds(self) -> float: ...
    @property
    def images_per_second(self) -> float: ...
    @property
    def precision(self) -> str: ...


def _training_figures(result: _TrainingResult) -> dict[str, Any]:
    """What a training stage reports: steps reached, last loss, wall time, throughput, and
    the arithmetic it ran in (bf16 where the device has the units for it)."""
    return {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
        "precision": result.precision,
    }


def pretrained_encoder(pretrain_dir: Path) -> Path | None:
    """The encoder file in a pretrain output folder; None when pretraining was off."""
    pretrain_dir = Path(pretrain_dir)
    if (pretrain_dir / SKIPPED).is_file():
        return None
    encoder = pretrain_dir / ENCODER_FILE
    if not encoder.is_file():
        raise FileNotFoundError(
            f"{pretrain_dir}: no {ENCODER_FILE}; pass the output folder of `drseg pretrain`"
        )
    return encoder


def pretrain_step(
    pool_dirs: list[Path],
    labelled_dir: Path | None,
    out_dir: Path,
    model: ModelSettings,
    settings: PretrainSettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str | None = None,
) -> dict[str, Any]:
    """SimCLR on the pool (and the labelled train split), tracked; writes <out>/encoder.pt.

    With pretraining off it writes only the SKIPPED marker, so fine-tuning starts from
    random weights and the pipeline keeps one shape. Without a pipeline run id (in the
    pipeline, where the step is cached across runs) the MLflow run is grouped under
    "pretrain-<hash of its inputs and settings>", the runs that made the same encoder.
    """
    from drseg.data.dataset import content_hash, load_manifest

    out_dir = Path(out_dir)
    if not settings.enabled:
        atomic.write_text(out_dir / SKIPPED, "pretrain.enabled is false\n")
        return {"skipped": True, "reason": "pretrain.enabled is false: random initialisation"}

    from drseg.tracking import stage_run
    from drseg.train.pretrain import pretrain

    inputs = [*pool_dirs, *([labelled_dir] if labelled_dir and settings.include_labelled else [])]
    dataset_hash = content_hash([load_manifest(d).dataset_hash for d in inputs])
    if pipeline_run_id is None:
        key = content_hash([dataset_hash, model.encoder, settings.model_dump_json()])
        pipeline_run_id = f"pretrain-{key[:16]}"
    with stage_run(
        tracking,
        home,
        "pretrain",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=dataset_hash,
        config={"model": model, "pretrain": settings},
    ) as run:
        result = pretrain(pool_dirs, out_dir, model, settings, run.metric_logger(), labelled_dir)
        figures = _training_figures(result)
        run.log_metrics(figures)
    return {
        **figures,
        "skipped": False,
        "encoder": str(result.encoder),
        "dataset_hash": dataset_hash,
        "mlflow_run_id": run.run_id,
    }


def finetune_step(
    dataset_dir: Path,
    model_dir: Path,
    model: ModelSettings,
    settings: FinetuneSettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
    encoder: Path | None = None,
) -> dict[str, Any]:
    """Train, track, and write the model folder; returns the figures for the summary.

    `encoder`: encoder weights to start from (the pretrain stage's); None: random weights.
    """
    from drseg.data.dataset import load_manifest, sha256
    from drseg.tracking import stage_run
    from drseg.train.finetune import finetune

    dataset_hash = load_manifest(dataset_dir).dataset_hash
    encoder_init = "random" if encoder is None else sha256(Path(encoder).read_bytes())
    config = {"model": model, "finetune": settings, "encoder_init": encoder_init}
    with stage_run(
        tracking,
        home,
        "finetune",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=dataset_hash,
        config=config,
    ) as run:
        result = finetune(dataset_dir, model_dir, model, settings, run.metric_logger(), encoder)
        card = ModelCard(model, settings, dataset_hash, result.steps, encoder_init)
        atomic.write_text(Path(model_dir) / MODEL_CARD, card.to_json())
        figures = _training_figures(result)
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
    network = load_trained_model(Path(model_dir) / WEIGHTS_FILE, card.model, device)

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


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    summary: str
    """One line: "passed (1 rule)" or the failed rules and why."""
    markdown: str
    verdict_json: str
    mlflow_run_id: str


def gate_step(
    evaluation_dir: Path,
    settings: GateSettings,
    registry: RegistrySettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
) -> GateOutcome:
    """Apply the gate's rules to the evaluate stage's metrics.json, against @champion's
    metrics when the regression rule is on and tracking (hence the registry) is."""
    from drseg.evaluate.report import METRICS_FILE
    from drseg.gate import evaluate_gate, verdict_markdown, verdict_summary
    from drseg.tracking import stage_run, tracking_uri

    metrics_path = Path(evaluation_dir) / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{evaluation_dir}: no {METRICS_FILE}; pass the output folder of `drseg evaluate`"
        )
    metrics = json.loads(metrics_path.read_text())
    champion = None
    if settings.max_regression is not None and tracking.enabled:
        from drseg.registry import champion_metrics

        champion = champion_metrics(tracking_uri(tracking, home), registry.model_name)
    verdict = evaluate_gate(metrics, settings, champion, metrics["dataset_hash"])
    markdown, summary = verdict_markdown(verdict), verdict_summary(verdict)
    with stage_run(
        tracking,
        home,
        "gate",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=metrics["dataset_hash"],
        config=settings,
    ) as run:
        run.set_tags({"drseg.gate": summary})
        run.log_metrics({"gate.passed": float(verdict.passed)})
    return GateOutcome(verdict.passed, summary, markdown, verdict.model_dump_json(), run.run_id)


def export_step(
    model_dir: Path,
    evaluation_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    settings: ExportSettings,
    ingest: IngestSettings,
    clahe: ClaheSettings,
) -> dict[str, Any]:
    """ONNX with the serving contract (preprocessing + tuned thresholds), parity-checked
    against PyTorch on random inputs and a photograph of the dataset; <out>/model.onnx."""
    from drseg.evaluate.report import METRICS_FILE
    from drseg.export.onnx_export import export_onnx, export_summary

    result = export_onnx(
        model_dir,
        Path(evaluation_dir) / METRICS_FILE,
        Path(out_dir) / ONNX_FILE,
        settings,
        ingest,
        clahe,
        dataset_dir=dataset_dir,
    )
    return export_summary(result)


def register_step(
    onnx_dir: Path,
    model_dir: Path,
    evaluation_dir: Path,
    verdict_json: str,
    registry: RegistrySettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
) -> dict[str, Any]:
    """A new registry version (alias @challenger) from the ONNX file and the weights,
    tagged with lineage, metrics and the gate's verdict."""
    from drseg.evaluate.report import METRICS_FILE
    from drseg.gate import GateVerdict
    from drseg.registry import register_model
    from drseg.tracking import git_commit, stage_run, tracking_uri

    if not tracking.enabled:
        raise ValueError(
            "the model registry is MLflow's: set tracking.enabled to true (and tracking.uri "
            "to the server holding the registry) to register models"
        )
    metrics = json.loads((Path(evaluation_dir) / METRICS_FILE).read_text())
    card = ModelCard.read(model_dir)
    with stage_run(
        tracking,
        home,
        "register",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=card.dataset_hash,
        config=registry,
    ) as run:
        version = register_model(
            tracking_uri(tracking, home),
            registry.model_name,
            Path(onnx_dir) / ONNX_FILE,
            Path(model_dir) / WEIGHTS_FILE,
            run_id=run.run_id,
            dataset_hash=card.dataset_hash,
            metrics=metrics,
            verdict=GateVerdict.model_validate_json(verdict_json),
            git_commit=git_commit(),
            pipeline_run_id=pipeline_run_id,
        )
        run.set_tags({"drseg.registered_version": version})
    return {"model_name": registry.model_name, "version": version, "alias": "challenger"}


def engine_step(onnx_dir: Path, out_dir: Path, settings: ExportSettings) -> dict[str, Any]:
    """A TensorRT engine where TensorRT and a GPU exist; else nothing, and says so."""
    from drseg.export.tensorrt_build import build_engine

    Path(out_dir).mkdir(parents=True, exist_ok=True)  # the output artifact, even when empty
    result = build_engine(Path(onnx_dir) / ONNX_FILE, Path(out_dir), settings)
    return {
        "served_format": result.served_format,
        "reason": result.reason,
        "plan": None if result.plan is None else str(result.plan),
    }


def repository_step(
    onnx_dir: Path,
    engine_dir: Path,
    version: int,
    out_dir: Path,
    settings: ServeSettings,
) -> dict[str, Any]:
    """A Triton model repository with `version` (the registry's), serving the engine when
    one was built, else the ONNX model."""
    from drseg.serving.repository import write_repository

    plan = Path(engine_dir) / "model.plan"
    version_dir = write_repository(
        Path(out_dir),
        Path(onnx_dir) / ONNX_FILE,
        version,
        settings,
        plan_path=plan if plan.is_file() else None,
    )
    return {
        "repository": str(out_dir),
        "model_name": settings.model_name,
        "version": version,
        "served_format": "tensorrt_plan" if plan.is_file() else "onnx",
        "version_dir": str(version_dir),
    }
