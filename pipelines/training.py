"""The retraining pipeline: one DAG for kfp.local and for Kubeflow Pipelines.

Each step takes its settings section as JSON; the defaults are drseg.config's, the one
source of truth, and `drseg run` fills them from the user's settings.
"""

from components.clahe import clahe
from components.evaluate import evaluate
from components.finetune import finetune
from components.ingest import ingest
from kfp import dsl

from drseg.config import (
    ClaheSettings,
    EvaluateSettings,
    FinetuneSettings,
    IngestSettings,
    ModelSettings,
)


def _gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One NVIDIA GPU for a training step (kfp.local ignores it)."""
    return task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)


@dsl.pipeline(name="drseg-training", description="Fundus lesion segmentation retraining")
def training(
    source: str,
    ingest_config: str = IngestSettings().model_dump_json(),
    clahe_config: str = ClaheSettings().model_dump_json(),
    model_config: str = ModelSettings().model_dump_json(),
    finetune_config: str = FinetuneSettings().model_dump_json(),
    evaluate_config: str = EvaluateSettings().model_dump_json(),
) -> None:
    ingested = ingest(source=source, config=ingest_config).set_display_name("ingest")
    enhanced = clahe(
        dataset=ingested.outputs["dataset"],
        dataset_hash=ingested.outputs["Output"],
        config=clahe_config,
    ).set_display_name("clahe")
    trained = _gpu(
        finetune(
            dataset=enhanced.outputs["enhanced"],
            dataset_hash=enhanced.outputs["Output"],
            model_config=model_config,
            config=finetune_config,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("finetune")
    )
    _gpu(
        evaluate(
            model=trained.outputs["model"],
            dataset=enhanced.outputs["enhanced"],
            config=evaluate_config,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("evaluate")
    )
