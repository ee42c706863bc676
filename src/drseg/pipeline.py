"""The one place where settings become the pipeline: its arguments, the built DAG, and the
compiled YAML. `drseg run` (kfp.local) and `drseg pipeline` (a cluster) both come here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from drseg.config import ClusterSettings, Settings, StepsResources
from drseg.errors import UserError

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent

COMPILED = Path("pipelines/compiled/training.yaml")
"""Where `drseg pipeline compile` writes by default (relative to the repository root)."""


def pipeline_arguments(settings: Settings, source: str, pool: str | None) -> dict[str, Any]:
    """Settings -> the pipeline's parameters (names as in pipelines/training.py).

    `pool` is the unlabelled pool for pretraining. Without one, pretraining must be off:
    the labelled source then stands in as the pool input, which the pretrain step skips.
    """
    pool_ingest = settings.ingest.model_copy(update={"layout": "unlabelled", "val_fraction": 0.0})
    if pool is None:
        if settings.pretrain.enabled:
            raise UserError(
                "no unlabelled pool for pretraining: pass --pool FOLDER|s3://... (a tree of "
                "photographs, e.g. IDRiD's unlabelled set), or set pretrain.enabled: false "
                "to fine-tune from random weights"
            )
        pool, pool_ingest = source, settings.ingest
    return {
        "source": source,
        "pool_source": pool,
        "ingest_config": settings.ingest.model_dump_json(),
        "pool_ingest_config": pool_ingest.model_dump_json(),
        "clahe_config": settings.clahe.model_dump_json(),
        "model_config": settings.model.model_dump_json(),
        "pretrain_config": settings.pretrain.model_dump_json(),
        "finetune_config": settings.finetune.model_dump_json(),
        "evaluate_config": settings.evaluate.model_dump_json(),
        "gate_config": settings.gate.model_dump_json(),
        "registry_config": settings.registry.model_dump_json(),
        "export_config": settings.export.model_dump_json(),
        "serve_config": settings.serve.model_dump_json(),
        "rollout_config": settings.rollout.model_dump_json(),
    }


def build(
    cluster: ClusterSettings | None = None,
    pretrain_on_labelled: bool = False,
    publish_to_store: bool = True,
    retry: bool = True,
) -> GraphComponent:
    """The training pipeline placed on the cluster `cluster` describes; see build_pipeline
    for `pretrain_on_labelled` (pretrain.include_labelled) and `publish_to_store`.

    `retry` False drops every step's retries: kfp.local honours retry policies, and a local
    run (`drseg run`) should fail at once on a bad source, not after minutes of backoff for
    a fault that is not transient there."""
    from pipelines.training import build_pipeline

    cluster = cluster or ClusterSettings()
    if not retry:
        steps = {name: {**step.model_dump(), "retries": 0} for name, step in cluster.steps}
        cluster = cluster.model_copy(update={"steps": StepsResources.model_validate(steps)})
    return build_pipeline(cluster, pretrain_on_labelled, publish_to_store)


def display_names(pipeline: GraphComponent) -> dict[str, str]:
    """Task name -> display name across every DAG of the pipeline: kfp names a second use
    of a component "ingest-2", and the steps sit inside the exit handler's DAG."""
    spec = pipeline.pipeline_spec
    dags = [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]
    return {name: task.task_info.name for dag in dags for name, task in dag.tasks.items()}


def compile_pipeline(
    out: Path, cluster: ClusterSettings | None = None, pretrain_on_labelled: bool = False
) -> Path:
    """Compile the pipeline to `out` (two YAML documents: the DAG, then Kubernetes settings)."""
    from kfp import compiler

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(cluster, pretrain_on_labelled), str(out))
    return out
