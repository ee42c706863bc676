"""The retraining pipeline: one DAG for kfp.local and for Kubeflow Pipelines.

Each step takes its settings section as JSON; the defaults are drseg.config's, the one
source of truth, and `drseg run` fills them from the user's settings.
"""

from components.clahe import clahe
from components.evaluate import evaluate
from components.export import export
from components.finetune import finetune
from components.gate import gate
from components.ingest import ingest
from components.pretrain import pretrain
from components.register import register
from components.tensorrt import tensorrt
from components.triton_repository import triton_repository
from kfp import dsl

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
)

POOL_INGEST = IngestSettings(layout="unlabelled", val_fraction=0.0)
"""The unlabelled pool: every photograph in the tree, no split (all of it is pretraining data)."""


def _gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One NVIDIA GPU for a training step (kfp.local ignores it)."""
    return task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)


@dsl.pipeline(name="drseg-training", description="Fundus lesion segmentation retraining")
def training(
    source: str,
    pool_source: str,
    ingest_config: str = IngestSettings().model_dump_json(),
    pool_ingest_config: str = POOL_INGEST.model_dump_json(),
    clahe_config: str = ClaheSettings().model_dump_json(),
    model_config: str = ModelSettings().model_dump_json(),
    pretrain_config: str = PretrainSettings().model_dump_json(),
    finetune_config: str = FinetuneSettings().model_dump_json(),
    evaluate_config: str = EvaluateSettings().model_dump_json(),
    gate_config: str = GateSettings().model_dump_json(),
    registry_config: str = RegistrySettings().model_dump_json(),
    export_config: str = ExportSettings().model_dump_json(),
    serve_config: str = ServeSettings().model_dump_json(),
) -> None:
    ingested = ingest(source=source, config=ingest_config).set_display_name("ingest")
    enhanced = clahe(
        dataset=ingested.outputs["dataset"],
        dataset_hash=ingested.outputs["Output"],
        config=clahe_config,
    ).set_display_name("clahe")
    pool = ingest(source=pool_source, config=pool_ingest_config).set_display_name("pool-ingest")
    enhanced_pool = clahe(
        dataset=pool.outputs["dataset"], dataset_hash=pool.outputs["Output"], config=clahe_config
    ).set_display_name("pool-clahe")
    pretrained = _gpu(
        pretrain(
            pool=enhanced_pool.outputs["enhanced"],
            pool_hash=enhanced_pool.outputs["Output"],
            labelled=enhanced.outputs["enhanced"],
            model_config=model_config,
            config=pretrain_config,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("pretrain")
    )
    trained = _gpu(
        finetune(
            dataset=enhanced.outputs["enhanced"],
            dataset_hash=enhanced.outputs["Output"],
            encoder=pretrained.outputs["encoder"],
            model_config=model_config,
            config=finetune_config,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("finetune")
    )
    evaluated = _gpu(
        evaluate(
            model=trained.outputs["model"],
            dataset=enhanced.outputs["enhanced"],
            config=evaluate_config,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("evaluate")
    )
    verdict = gate(
        evaluation=evaluated.outputs["evaluation"],
        config=gate_config,
        registry_config=registry_config,
        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("gate")
    # A failed gate ends the run here, cleanly: nothing below runs, nothing is registered.
    with dsl.If(verdict.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a DSL condition)
        exported = export(
            model=trained.outputs["model"],
            evaluation=evaluated.outputs["evaluation"],
            dataset=enhanced.outputs["enhanced"],
            config=export_config,
            ingest_config=ingest_config,
            clahe_config=clahe_config,
        ).set_display_name("export")
        registered = register(
            onnx=exported.outputs["onnx"],
            model=trained.outputs["model"],
            evaluation=evaluated.outputs["evaluation"],
            verdict=verdict.outputs["verdict"],
            registry_config=registry_config,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("register")
        engine = _gpu(
            tensorrt(onnx=exported.outputs["onnx"], config=export_config).set_display_name(
                "tensorrt"
            )
        )
        triton_repository(
            onnx=exported.outputs["onnx"],
            engine=engine.outputs["engine"],
            version=registered.outputs["Output"],
            config=serve_config,
        ).set_display_name("triton-repository")
