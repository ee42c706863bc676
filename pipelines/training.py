"""The retraining pipeline: one DAG for kfp.local and for Kubeflow Pipelines.

Each step takes its settings section as JSON; the defaults are drseg.config's, the one
source of truth, and `drseg run` fills them from the user's settings. Cluster placement
(GPU nodes, /dev/shm, Secrets) and each step's image, resources, retries and deadline
(cluster.steps) are fixed when the pipeline is built, so `build_pipeline` takes them as
ClusterSettings; kfp.local ignores all but the retries, with a warning. Every step runs
inside an exit handler that closes the run's MLflow runs after a failure.
"""

from components.clahe import clahe
from components.close_runs import close_runs
from components.evaluate import evaluate
from components.export import export
from components.finetune import finetune
from components.fingerprint import fingerprint
from components.gate import gate
from components.ingest import ingest
from components.pretrain import pretrain
from components.publish import publish
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
    GpuStepResources,
    IngestSettings,
    ModelSettings,
    PretrainSettings,
    RegistrySettings,
    RolloutSettings,
    ServeSettings,
    StepResources,
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


def _gpu(task: dsl.PipelineTask, gpu: GpuStepResources, cluster: ClusterSettings) -> None:
    """`gpu.gpus` GPUs on a GPU node (selector and taint toleration), with a memory-backed
    /dev/shm for DataLoader workers."""
    task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpu.gpus)
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


def _sized(
    task: dsl.PipelineTask, step: StepResources, cluster: ClusterSettings
) -> dsl.PipelineTask:
    """The step's image (cluster.image_registry/tag; the component names which image),
    CPU and memory, retries, deadline and, for a GPU step, its GPUs and node placement, from
    cluster.steps (kfp.local ignores all of it)."""
    image = task.container_spec.image.rsplit("/", 1)[-1].rsplit(":", 1)[0]
    task.set_container_image(cluster.image(image))
    task.set_cpu_request(step.cpu_request).set_memory_request(step.memory_request)
    if step.cpu_limit is not None:
        task.set_cpu_limit(step.cpu_limit)
    if step.memory_limit is not None:
        task.set_memory_limit(step.memory_limit)
    if step.retries:
        task.set_retry(
            step.retries,
            backoff_duration=f"{step.backoff_s}s",
            backoff_factor=step.backoff_factor,
            backoff_max_duration=f"{step.retry_window_s}s",
        )
    if step.timeout_s:
        kubernetes.set_timeout(task, step.timeout_s)
    if isinstance(step, GpuStepResources):
        _gpu(task, step, cluster)
    return task


def _prepared(
    source: str, ingest_config: str, clahe_config: str, cluster: ClusterSettings, prefix: str
) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """fingerprint -> ingest -> CLAHE of one source; returns the ingest and CLAHE tasks.

    KFP keys a task's cache on its parameters and on the identity of its input artifacts,
    never on the data behind a path. So only the cheap listing hash always runs; ingest is
    cached on it, which keeps its dataset artifact (and so the keys of everything after it)
    the same while the source is unchanged, and makes a new one when a file changes.
    """
    steps = cluster.steps
    listed = _cached(
        _sized(_storage(fingerprint(source=source), cluster), steps.fingerprint, cluster), False
    )
    ingested = _cached(
        _sized(
            _storage(
                ingest(source=source, source_fingerprint=listed.output, config=ingest_config),
                cluster,
            ),
            steps.ingest,
            cluster,
        ),
        True,
    )
    enhanced = _cached(
        _sized(
            clahe(
                dataset=ingested.outputs["dataset"],
                dataset_hash=ingested.outputs["Output"],
                config=clahe_config,
            ),
            steps.clahe,
            cluster,
        ),
        True,
    )
    listed.set_display_name(f"{prefix}fingerprint")
    ingested.set_display_name(f"{prefix}ingest")
    enhanced.set_display_name(f"{prefix}clahe")
    return ingested, enhanced


def build_pipeline(
    cluster: ClusterSettings, pretrain_on_labelled: bool = False, publish_to_store: bool = True
) -> GraphComponent:
    """The pipeline with `cluster`'s placement and Secrets.

    `publish_to_store` ends a passing run by publishing its Triton repository where the
    Rollout reads it (rollout.repository_uri); a local run (`drseg run`) serves its own
    repository instead and builds the pipeline without it.

    `pretrain_on_labelled` (pretrain.include_labelled) wires the labelled train split into
    pretraining. It is fixed here, not a run parameter, because an input artifact is part of
    the cache key: wired in, new labelled data re-runs pretraining even where it would not
    be used.
    """

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
        rollout_config: str = RolloutSettings().model_dump_json(),
    ) -> None:
        # Caching: the data steps and pretraining are cached on content (see _prepared):
        # pretraining is hours of GPU on an unchanged pool, so it takes no pipeline run id
        # and its MLflow runs group by their inputs instead. Everything from fine-tuning on
        # is per run, and from the gate on it reads or changes state outside the run (the
        # registry's @champion, the model repository), so a cached result would be a stale
        # answer: those always run.
        steps = cluster.steps
        # The exit handler runs after every other step, whatever their outcome: after a
        # failure or a cancellation it ends the pipeline's MLflow runs that a lost pod left
        # open (drseg.tracking.close_pipeline_runs); after success it changes nothing.
        closing = _cached(
            _sized(
                _tracking(close_runs(pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), cluster),
                steps.close_runs,
                cluster,
            ),
            False,
        ).set_display_name("close-runs")
        with dsl.ExitHandler(closing, name="training"):
            ingested, enhanced = _prepared(source, ingest_config, clahe_config, cluster, "")
            _, enhanced_pool = _prepared(
                pool_source, pool_ingest_config, clahe_config, cluster, "pool-"
            )
            pretrain_task = pretrain(
                pool=enhanced_pool.outputs["enhanced"],
                pool_hash=enhanced_pool.outputs["Output"],
                model_config=model_config,
                config=pretrain_config,
                **({"labelled": enhanced.outputs["enhanced"]} if pretrain_on_labelled else {}),
            )
            pretrained = _cached(
                _sized(_tracking(pretrain_task, cluster), steps.pretrain, cluster), True
            ).set_display_name("pretrain")
            # finetune and evaluate log into this run's MLflow runs, which the gate and the
            # registry then point at: a cached copy would leave this run without them.
            trained = _cached(
                _sized(
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
                    steps.finetune,
                    cluster,
                ),
                False,
            ).set_display_name("finetune")
            # The gate scores the served artifact: export first, then evaluate THE GRAPH on the
            # photographs as `drseg predict` sends them (the ingest-stage dataset: the client
            # applies CLAHE itself), beside @champion's graph on the same photographs.
            exported = _cached(
                _sized(
                    export(
                        model=trained.outputs["model"],
                        dataset=enhanced.outputs["enhanced"],
                        config=export_config,
                        ingest_config=ingest_config,
                        clahe_config=clahe_config,
                    ),
                    steps.export,
                    cluster,
                ),
                False,
            ).set_display_name("export")
            # evaluate reads the registry's @champion, which moves: never cached.
            evaluated = _cached(
                _sized(
                    _tracking(
                        evaluate(
                            onnx=exported.outputs["onnx"],
                            dataset=ingested.outputs["dataset"],
                            config=evaluate_config,
                            registry_config=registry_config,
                            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                        ),
                        cluster,
                    ),
                    steps.evaluate,
                    cluster,
                ),
                False,
            ).set_display_name("evaluate")
            verdict = _cached(
                _sized(
                    _tracking(
                        gate(
                            evaluation=evaluated.outputs["evaluation"],
                            config=gate_config,
                            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                        ),
                        cluster,
                    ),
                    steps.gate,
                    cluster,
                ),
                False,
            ).set_display_name("gate")
            # A failed gate ends the run here, cleanly: nothing below runs, nothing is registered.
            with dsl.If(verdict.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a DSL condition)
                # The served graph is the one the gate scored, with the thresholds evaluation
                # tuned in its contract; tensorrt and triton-repository feed this run's version,
                # so a cached artifact from an earlier run would be served under it.
                served = evaluated.outputs["served"]
                # register creates a registry version: it must happen once per passing run.
                registered = _cached(
                    _sized(
                        _tracking(
                            register(
                                onnx=served,
                                model=trained.outputs["model"],
                                evaluation=evaluated.outputs["evaluation"],
                                verdict=verdict.outputs["verdict"],
                                registry_config=registry_config,
                                pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                            ),
                            cluster,
                        ),
                        steps.registration,
                        cluster,
                    ),
                    False,
                ).set_display_name("register")
                engine = _cached(
                    _sized(
                        tensorrt(
                            onnx=served, dataset=ingested.outputs["dataset"], config=export_config
                        ),
                        steps.tensorrt,
                        cluster,
                    ),
                    False,
                ).set_display_name("tensorrt")
                repository = _cached(
                    _sized(
                        triton_repository(
                            onnx=served,
                            engine=engine.outputs["engine"],
                            version=registered.outputs["Output"],
                            config=serve_config,
                        ),
                        steps.triton_repository,
                        cluster,
                    ),
                    False,
                ).set_display_name("triton-repository")
                if publish_to_store:
                    # Idempotent (a published version is never rewritten), yet it writes outside
                    # the run: always run.
                    _cached(
                        _sized(
                            _storage(
                                publish(
                                    repository=repository.outputs["repository"],
                                    version=registered.outputs["Output"],
                                    serve_config=serve_config,
                                    config=rollout_config,
                                ),
                                cluster,
                            ),
                            steps.publish,
                            cluster,
                        ),
                        False,
                    ).set_display_name("publish")

    return dsl.pipeline(name="drseg-training", description="Fundus lesion segmentation retraining")(
        training
    )
