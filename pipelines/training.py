"""The retraining pipeline: one DAG for kfp.local and for Kubeflow Pipelines.

Each step takes its settings section as JSON; the defaults are drseg.config's, the one
source of truth, and `drseg run` fills them from the user's settings. Cluster placement
(GPU nodes, /dev/shm, Secrets) is fixed when the pipeline is built, so `build_pipeline`
takes it as ClusterSettings; kfp.local ignores it with a warning.
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
from kfp import dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent

from drseg.config import (
    ClaheSettings,
    ClusterSettings,
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


def _cached(task: dsl.PipelineTask, enabled: bool) -> dsl.PipelineTask:
    """Caching stated on every task, so the compiled file does not depend on the compiling
    machine's KFP_DISABLE_EXECUTION_CACHING_BY_DEFAULT."""
    return task.set_caching_options(enabled)


def _storage(task: dsl.PipelineTask, cluster: ClusterSettings) -> dsl.PipelineTask:
    """S3 credentials from their Secret: only the Secret's name is in the compiled YAML."""
    kubernetes.use_secret_as_env(task, cluster.s3_secret, dict(cluster.s3_secret_env))
    return task


def _tracking(task: dsl.PipelineTask, cluster: ClusterSettings) -> dsl.PipelineTask:
    """MLflow server and credentials from their Secret, plus S3 (MLflow's artifact store:
    the client uploads artifacts to it directly)."""
    kubernetes.use_secret_as_env(task, cluster.mlflow_secret, dict(cluster.mlflow_secret_env))
    return _storage(task, cluster)


def _gpu(task: dsl.PipelineTask, cluster: ClusterSettings) -> dsl.PipelineTask:
    """One NVIDIA GPU, on a GPU node (selector and taint toleration), with a memory-backed
    /dev/shm for DataLoader workers (kfp.local ignores all of it)."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_node_selector_json(task, dict(cluster.gpu_node_selector))
    for toleration in cluster.gpu_tolerations:
        kubernetes.add_toleration(
            task,
            key=toleration.key,
            operator=toleration.operator,
            value=toleration.value,
            effect=toleration.effect,
        )
    kubernetes.empty_dir_mount(
        task,
        volume_name="dshm",
        mount_path="/dev/shm",
        medium="Memory",
        size_limit=f"{cluster.shm_size_gi}Gi",
    )
    return task


def build_pipeline(cluster: ClusterSettings) -> GraphComponent:
    """The pipeline with `cluster`'s placement and Secrets; the DAG is the same for any."""

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
        # Caching: KFP keys a task's cache on its parameters, not on the data behind a path.
        # So ingest always runs (a source prefix can hold new photographs tomorrow) and
        # computes the content hash; the steps after it take that hash as a parameter and
        # are reused when content and settings are unchanged: CLAHE, and pretraining (hours
        # of GPU on an unchanged pool; it takes no pipeline run id for that reason, and its
        # MLflow runs group by their inputs instead). Everything from the gate on reads or
        # changes state outside the run (the registry's @champion, the model repository),
        # so a cached result would be a stale answer: those always run.
        ingested = _cached(
            _storage(ingest(source=source, config=ingest_config), cluster), False
        ).set_display_name("ingest")
        enhanced = _cached(
            clahe(
                dataset=ingested.outputs["dataset"],
                dataset_hash=ingested.outputs["Output"],
                config=clahe_config,
            ),
            True,
        ).set_display_name("clahe")
        pool = _cached(
            _storage(ingest(source=pool_source, config=pool_ingest_config), cluster), False
        ).set_display_name("pool-ingest")
        enhanced_pool = _cached(
            clahe(
                dataset=pool.outputs["dataset"],
                dataset_hash=pool.outputs["Output"],
                config=clahe_config,
            ),
            True,
        ).set_display_name("pool-clahe")
        pretrained = _cached(
            _gpu(
                _tracking(
                    pretrain(
                        pool=enhanced_pool.outputs["enhanced"],
                        pool_hash=enhanced_pool.outputs["Output"],
                        labelled=enhanced.outputs["enhanced"],
                        model_config=model_config,
                        config=pretrain_config,
                    ),
                    cluster,
                ),
                cluster,
            ),
            True,
        ).set_display_name("pretrain")
        # finetune and evaluate log into this run's MLflow runs, which the gate and the
        # registry then point at: a cached copy would leave this run without them.
        trained = _cached(
            _gpu(
                _tracking(
                    finetune(
                        dataset=enhanced.outputs["enhanced"],
                        dataset_hash=enhanced.outputs["Output"],
                        encoder=pretrained.outputs["encoder"],
                        model_config=model_config,
                        config=finetune_config,
                        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    ),
                    cluster,
                ),
                cluster,
            ),
            False,
        ).set_display_name("finetune")
        evaluated = _cached(
            _gpu(
                _tracking(
                    evaluate(
                        model=trained.outputs["model"],
                        dataset=enhanced.outputs["enhanced"],
                        config=evaluate_config,
                        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    ),
                    cluster,
                ),
                cluster,
            ),
            False,
        ).set_display_name("evaluate")
        # The gate compares against the registry's current @champion, which moves.
        verdict = _cached(
            _tracking(
                gate(
                    evaluation=evaluated.outputs["evaluation"],
                    config=gate_config,
                    registry_config=registry_config,
                    pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                ),
                cluster,
            ),
            False,
        ).set_display_name("gate")
        # A failed gate ends the run here, cleanly: nothing below runs, nothing is registered.
        with dsl.If(verdict.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a DSL condition)
            # export, tensorrt and triton-repository feed this run's registered version; a
            # cached artifact from an earlier run would be served under the new version.
            exported = _cached(
                export(
                    model=trained.outputs["model"],
                    evaluation=evaluated.outputs["evaluation"],
                    dataset=enhanced.outputs["enhanced"],
                    config=export_config,
                    ingest_config=ingest_config,
                    clahe_config=clahe_config,
                ),
                False,
            ).set_display_name("export")
            # register creates a registry version: it must happen once per passing run.
            registered = _cached(
                _tracking(
                    register(
                        onnx=exported.outputs["onnx"],
                        model=trained.outputs["model"],
                        evaluation=evaluated.outputs["evaluation"],
                        verdict=verdict.outputs["verdict"],
                        registry_config=registry_config,
                        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    ),
                    cluster,
                ),
                False,
            ).set_display_name("register")
            engine = _cached(
                _gpu(tensorrt(onnx=exported.outputs["onnx"], config=export_config), cluster),
                False,
            ).set_display_name("tensorrt")
            _cached(
                triton_repository(
                    onnx=exported.outputs["onnx"],
                    engine=engine.outputs["engine"],
                    version=registered.outputs["Output"],
                    config=serve_config,
                ),
                False,
            ).set_display_name("triton-repository")

    return dsl.pipeline(name="drseg-training", description="Fundus lesion segmentation retraining")(
        training
    )


training = build_pipeline(ClusterSettings())
"""The pipeline with the default cluster settings: what `drseg run` and the checked-in
pipelines/compiled/training.yaml use."""
