"""The training and evaluation steps as the pipeline runs them: library call + tracking +
the files of the output artifact. KFP components and `drseg <verb>` both call these.

What the output folders hold, and the model card, are in drseg.artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
    StorageSettings,
    TrackingSettings,
)
from drseg.evaluate.schema import METRICS_FILE, Metrics

if TYPE_CHECKING:
    from drseg.contract import ServingContract
    from drseg.evaluate.served import ServedGraph
    from drseg.tracking import NullRun, StageRun


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


def _training_figures(result: _TrainingResult, run: StageRun | NullRun) -> dict[str, Any]:
    """What a training stage reports: steps reached, last loss, wall time, throughput, and
    the arithmetic it ran in (bf16 where the device has the units for it). The numbers go to
    MLflow as metrics, the precision as a tag."""
    numbers = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
    }
    run.log_metrics(numbers)
    run.set_tags({"drseg.precision": result.precision})
    return {**numbers, "precision": result.precision}


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
    storage: StorageSettings | None = None,
) -> dict[str, Any]:
    """SimCLR on the pool (and the labelled train split), tracked; writes <out>/encoder.pt.

    With pretraining off it writes only the SKIPPED marker, so fine-tuning starts from
    random weights and the pipeline keeps one shape. Without a pipeline run id (in the
    pipeline, where the step is cached across runs) the MLflow run is grouped under
    "pretrain-<hash of its inputs and settings>", the runs that made the same encoder,
    and its checkpoints (pretrain.checkpoint_uri, through `storage`) under the same name.
    """
    from drseg.data.dataset import content_hash, load_manifest

    out_dir = Path(out_dir)
    if not settings.enabled:
        atomic.write_text(out_dir / SKIPPED, "pretrain.enabled is false\n")
        return {"skipped": True, "reason": "pretrain.enabled is false: random initialisation"}

    from drseg.tracking import stage_run
    from drseg.train import checkpoint_store
    from drseg.train.pretrain import pretrain

    inputs = [*pool_dirs, *([labelled_dir] if labelled_dir and settings.include_labelled else [])]
    dataset_hash = content_hash([load_manifest(d).dataset_hash for d in inputs])
    if pipeline_run_id is None:
        key = content_hash([dataset_hash, model.encoder, settings.model_dump_json()])
        pipeline_run_id = f"pretrain-{key[:16]}"
    settings = checkpoint_store.for_run(settings, f"pretrain/{pipeline_run_id}")
    with stage_run(
        tracking,
        home,
        "pretrain",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=dataset_hash,
        config={"model": model, "pretrain": settings},
    ) as run:
        result = pretrain(
            pool_dirs, out_dir, model, settings, run.metric_logger(), labelled_dir, storage
        )
        figures = _training_figures(result, run)
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
    storage: StorageSettings | None = None,
) -> dict[str, Any]:
    """Train, track, and write the model folder; returns the figures for the summary.

    `encoder`: encoder weights to start from (the pretrain stage's); None: random weights.
    Checkpoints also go to <finetune.checkpoint_uri>/finetune/<pipeline run id> (through
    `storage`), where a retry of this pipeline run's step resumes from them.
    """
    from drseg.data.dataset import load_manifest, sha256
    from drseg.tracking import stage_run
    from drseg.train import checkpoint_store
    from drseg.train.finetune import finetune

    dataset_hash = load_manifest(dataset_dir).dataset_hash
    encoder_init = "random" if encoder is None else sha256(Path(encoder).read_bytes())
    settings = checkpoint_store.for_run(settings, f"finetune/{pipeline_run_id}")
    config = {"model": model, "finetune": settings, "encoder_init": encoder_init}
    with stage_run(
        tracking,
        home,
        "finetune",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=dataset_hash,
        config=config,
    ) as run:
        result = finetune(
            dataset_dir, model_dir, model, settings, run.metric_logger(), encoder, storage
        )
        card = ModelCard(model, settings, dataset_hash, result.steps, encoder_init)
        atomic.write_text(Path(model_dir) / MODEL_CARD, card.to_json())
        figures = _training_figures(result, run)
        run.log_artifact(Path(model_dir) / MODEL_CARD)
    return {**figures, "weights": str(result.weights), "mlflow_run_id": run.run_id}


def export_step(
    model_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    settings: ExportSettings,
    ingest: IngestSettings,
    clahe: ClaheSettings,
) -> dict[str, Any]:
    """ONNX with the serving contract (preprocessing; thresholds untuned until evaluation),
    parity-checked against PyTorch on random inputs and a photograph of the CLAHE-stage
    dataset; <out>/model.onnx."""
    from drseg.export.onnx_export import export_onnx, export_summary

    result = export_onnx(
        model_dir, None, Path(out_dir) / ONNX_FILE, settings, ingest, clahe, dataset_dir=dataset_dir
    )
    return export_summary(result)


CHAMPION_DIR = "champion"
"""In an evaluation folder: @champion's graph scored on the same photographs."""
NO_CHAMPION_FILE = "no_champion.txt"
"""In an evaluation folder instead of champion/: why no champion was scored."""


def _comparable_champion(
    challenger: ServingContract,
    registry: RegistrySettings,
    tracking: TrackingSettings,
    home: Path,
    dst: Path,
) -> tuple[int, ServedGraph] | str:
    """(version, graph) of @champion, downloaded into `dst`, when it can be scored on the
    challenger's photographs; else why not."""
    if not tracking.enabled:
        return "tracking is off (tracking.enabled false), so there is no registry to ask"
    from drseg.evaluate.served import ServedGraph
    from drseg.registry import champion_version, download_onnx
    from drseg.tracking import tracking_uri

    uri = tracking_uri(tracking, home)
    version = champion_version(uri, registry.model_name)
    if version is None:
        return f"{registry.model_name} has no @champion yet"
    graph = ServedGraph(download_onnx(uri, registry.model_name, version, dst))
    theirs = graph.contract
    if theirs.classes != challenger.classes:
        return f"@champion v{version} segments {theirs.classes}, not {challenger.classes}"
    if theirs.working_width != challenger.working_width:
        return (
            f"@champion v{version} works at width {theirs.working_width}, the challenger at "
            f"{challenger.working_width}: they cannot be scored on the same photographs"
        )
    return int(version), graph


def _score_champion(
    challenger: ServingContract,
    dataset_dir: Path,
    work: Path,
    settings: EvaluateSettings,
    registry: RegistrySettings,
    tracking: TrackingSettings,
    home: Path,
    split: str,
) -> Metrics | None:
    """@champion's registered graph scored like the challenger, into work/champion/; else
    work/no_champion.txt says why."""
    import tempfile

    from drseg.evaluate.report import evaluate_dataset
    from drseg.evaluate.served import SCORED

    with tempfile.TemporaryDirectory(prefix="drseg-champion-") as tmp:
        found = _comparable_champion(challenger, registry, tracking, home, Path(tmp))
        if isinstance(found, str):
            atomic.write_text(work / NO_CHAMPION_FILE, f"{found}\n")
            return None
        version, graph = found
        return evaluate_dataset(
            graph, dataset_dir, work / CHAMPION_DIR, settings, SCORED, split, model_version=version
        ).metrics


@dataclass(frozen=True)
class EvaluateOutcome:
    metrics: Metrics
    champion: Metrics | None
    report: Path
    mlflow_run_id: str


def evaluate_step(
    onnx_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    served_dir: Path,
    settings: EvaluateSettings,
    registry: RegistrySettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
    split: str = "val",
) -> EvaluateOutcome:
    """Score the exported graph as served on a split of the ingest-stage dataset, with
    cross-fitted thresholds, and @champion's registered graph on the same photographs;
    <out>/metrics.json (+ champion/ or no_champion.txt) and <served>/model.onnx: the graph
    with the thresholds tuned on the whole split in its contract. All tracked."""
    from drseg.data.dataset import load_manifest
    from drseg.evaluate.report import REPORT_FILE, evaluate_dataset
    from drseg.evaluate.served import SCORED, ServedGraph, check_photographs
    from drseg.export.onnx_export import with_thresholds
    from drseg.tracking import stage_run

    onnx_path = Path(onnx_dir) / ONNX_FILE
    graph = ServedGraph(onnx_path)
    check_photographs(Path(dataset_dir), graph.contract, onnx_path)
    with stage_run(
        tracking,
        home,
        "evaluate",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=load_manifest(dataset_dir).dataset_hash,
        config={"evaluate": settings, "split": split},
    ) as run:
        with atomic.output_dir(Path(out_dir)) as work:
            metrics = evaluate_dataset(graph, dataset_dir, work, settings, SCORED, split).metrics
            champion = _score_champion(
                graph.contract, dataset_dir, work, settings, registry, tracking, home, split
            )
        with_thresholds(onnx_path, metrics.shipped_thresholds(), Path(served_dir) / ONNX_FILE)
        run.log_metrics(metrics.scalars())
        if champion is not None:
            run.log_metrics({f"champion.{k}": v for k, v in champion.scalars().items()})
        run.log_artifact(Path(out_dir))
    return EvaluateOutcome(metrics, champion, Path(out_dir) / REPORT_FILE, run.run_id)


def read_evaluation(evaluation_dir: Path) -> tuple[Metrics, Metrics | None, str]:
    """(metrics, @champion's metrics or None, why there are none) of an evaluation folder."""

    evaluation_dir = Path(evaluation_dir)
    metrics = Metrics.read(evaluation_dir / METRICS_FILE)
    champion_file = evaluation_dir / CHAMPION_DIR / METRICS_FILE
    if champion_file.is_file():
        return metrics, Metrics.read(champion_file), ""
    reason_file = evaluation_dir / NO_CHAMPION_FILE
    if not reason_file.is_file():
        raise FileNotFoundError(
            f"{evaluation_dir}: neither {CHAMPION_DIR}/{METRICS_FILE} nor {NO_CHAMPION_FILE}, "
            f"so whether @champion was scored is unknown; pass the output folder of "
            f"`drseg evaluate`"
        )
    return metrics, None, reason_file.read_text().strip()


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    summary: str
    """One line: "passed (1 rule)" or the failed rules and why."""
    markdown: str
    verdict_json: str
    mlflow_run_id: str


def gate_step(
    metrics: Metrics,
    champion: Metrics | None,
    no_champion: str,
    settings: GateSettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
) -> GateOutcome:
    """Apply the gate's rules to the challenger's metrics and @champion's on the same
    photographs (None: `no_champion` says why), tracked."""
    from drseg.gate import evaluate_gate, verdict_markdown, verdict_summary
    from drseg.tracking import stage_run

    verdict = evaluate_gate(metrics, settings, champion, no_champion)
    markdown, summary = verdict_markdown(verdict), verdict_summary(verdict)
    with stage_run(
        tracking,
        home,
        "gate",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=metrics.dataset_hash,
        config=settings,
    ) as run:
        run.set_tags({"drseg.gate": summary})
        run.log_metrics({"gate.passed": float(verdict.passed)})
    return GateOutcome(verdict.passed, summary, markdown, verdict.model_dump_json(), run.run_id)


def register_step(
    served_dir: Path,
    model_dir: Path,
    evaluation_dir: Path,
    verdict_json: str,
    registry: RegistrySettings,
    tracking: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
) -> dict[str, Any]:
    """A new registry version (alias @challenger) from the served ONNX file (the graph the
    gate scored, with its thresholds) and the weights, tagged with lineage, metrics and the
    gate's verdict. Once per pipeline run: a retried step returns the version it made."""
    from drseg.gate import GateVerdict
    from drseg.registry import register_model, version_of_pipeline_run
    from drseg.tracking import git_commit, stage_run, tracking_uri

    if not tracking.enabled:
        raise ValueError(
            "the model registry is MLflow's: set tracking.enabled to true (and tracking.uri "
            "to the server holding the registry) to register models"
        )
    metrics = Metrics.read(Path(evaluation_dir) / METRICS_FILE)
    card = ModelCard.read(model_dir)
    with stage_run(
        tracking,
        home,
        "register",
        pipeline_run_id=pipeline_run_id,
        dataset_hash=card.dataset_hash,
        config=registry,
    ) as run:
        uri = tracking_uri(tracking, home)
        version = version_of_pipeline_run(uri, registry.model_name, pipeline_run_id)
        version = version or register_model(
            uri,
            registry.model_name,
            Path(served_dir) / ONNX_FILE,
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


def engine_step(
    onnx_dir: Path, dataset_dir: Path, out_dir: Path, settings: ExportSettings, split: str = "val"
) -> dict[str, Any]:
    """A TensorRT engine where TensorRT and a GPU exist, kept only if its masks agree with
    the graph's (the graph the gate scored) on the split's photographs of the ingest-stage
    dataset (export.plan_agreement); else nothing, and says why the graph is served."""
    from drseg.data.dataset import image_path, load_manifest
    from drseg.evaluate.served import ServedGraph, mask_agreement
    from drseg.export.tensorrt_build import PLAN_METADATA_FILE, build_engine, plan_runner

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # the output artifact, even when empty
    onnx_path = Path(onnx_dir) / ONNX_FILE
    result = build_engine(onnx_path, out_dir, settings)
    reason, plan = result.reason, result.plan
    if plan is not None:
        records = [r for r in load_manifest(dataset_dir).records if r.split == split]
        photos = [image_path(Path(dataset_dir), r.id) for r in records]
        graph = ServedGraph(onnx_path)
        agreement = mask_agreement(
            graph, ServedGraph(onnx_path, plan_runner(plan)), photos, settings.plan_agreement
        )
        if agreement.passed:
            reason = f"{reason}; the plan {agreement.describe()}"
        else:
            plan.unlink()
            (out_dir / PLAN_METADATA_FILE).unlink(missing_ok=True)
            reason, plan = f"TensorRT plan refused: it {agreement.describe()}", None
    return {
        "served_format": "onnx" if plan is None else "tensorrt_plan",
        "reason": reason,
        "plan": None if plan is None else str(plan),
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
