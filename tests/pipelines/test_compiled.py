"""The compiled pipeline a cluster runs, and the calls that put it on a KFP endpoint.

No KFP API server runs here: submit and schedule go through the real kfp.Client over a real
socket to a small HTTP server on 127.0.0.1 that records what the client sends.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from drseg.cluster import ClusterError, schedule, submit, validate_cron
from drseg.config import ClusterSettings, ModelSettings, PretrainSettings, Settings, load_settings
from drseg.pipeline import build, compile_pipeline, pipeline_arguments

CHECKED_IN = Path(__file__).parents[2] / "pipelines" / "compiled" / "training.yaml"
GPU_EXECUTORS = {"exec-pretrain", "exec-finetune", "exec-tensorrt"}
STORAGE_EXECUTORS = {"exec-ingest", "exec-ingest-2", "exec-fingerprint", "exec-fingerprint-2"}
TRACKING_EXECUTORS = {"exec-pretrain", "exec-finetune", "exec-evaluate", "exec-gate"}
TRACKING_EXECUTORS |= {"exec-register", "exec-close-runs"}
CACHED = {"ingest", "ingest-2", "clahe", "clahe-2", "pretrain"}
"""Steps keyed on the content of their data (see pipelines/training.py, test_cache_keys.py)."""
NOT_CACHED = {"fingerprint", "fingerprint-2", "finetune", "evaluate", "gate", "export"}
NOT_CACHED |= {"register"}
NOT_CACHED |= {"tensorrt", "triton-repository", "publish", "close-runs"}


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(CHECKED_IN.read_text()))


def _platform(documents: list[dict[str, Any]]) -> dict[str, Any]:
    executors: dict[str, Any] = documents[1]["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ]
    return executors


def test_checked_in_yaml_is_current(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "training.yaml", ClusterSettings())
    assert fresh.read_text() == CHECKED_IN.read_text(), (
        "pipelines/compiled/training.yaml is out of date with the pipeline code: run "
        "`drseg pipeline compile` and commit the result"
    )


def test_gpu_stages_land_on_gpu_nodes_with_shm(documents: list[dict[str, Any]]) -> None:
    platform = _platform(documents)
    for name in GPU_EXECUTORS:
        config = platform[name]
        selector = config["nodeSelector"]["nodeSelectorJson"]["runtimeValue"]["constant"]
        assert selector == {"nvidia.com/gpu.present": "true"}
        assert config["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert config["emptyDirMounts"] == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi"}
        ]
    for name, config in platform.items():
        if name not in GPU_EXECUTORS:
            assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(config), name


def test_credentials_come_from_secrets(documents: list[dict[str, Any]]) -> None:
    platform = _platform(documents)
    secrets = {
        name: {ref["secretName"]: ref["keyToEnv"] for ref in config.get("secretAsEnv", [])}
        for name, config in platform.items()
    }
    s3 = [
        {"secretKey": "access_key_id", "envVar": "AWS_ACCESS_KEY_ID"},
        {"secretKey": "secret_access_key", "envVar": "AWS_SECRET_ACCESS_KEY"},
        {"secretKey": "endpoint_url", "envVar": "AWS_ENDPOINT_URL_S3"},
    ]
    for name in STORAGE_EXECUTORS | TRACKING_EXECUTORS:
        assert secrets[name]["drseg-s3"] == s3, name
    for name in TRACKING_EXECUTORS:
        envs = {ref["envVar"] for ref in secrets[name]["drseg-mlflow"]}
        assert envs == {
            "DRSEG_TRACKING__URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        }
    for name in STORAGE_EXECUTORS:
        assert "drseg-mlflow" not in secrets[name], "ingest has no business with MLflow"
    # No step gets a credential as a literal container variable.
    for name, executor in documents[0]["deploymentSpec"]["executors"].items():
        assert "env" not in executor["container"], name


def test_no_credential_values_in_compiled_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinels = {
        "AWS_ACCESS_KEY_ID": "AKIASENTINELKEYID",
        "AWS_SECRET_ACCESS_KEY": "sentinel-secret-access-key",
        "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-password",
        "DRSEG_TRACKING__URI": "https://sentinel-user:sentinel-pass@mlflow.example",
    }
    for key, value in sentinels.items():
        monkeypatch.setenv(key, value)
    text = compile_pipeline(tmp_path / "training.yaml").read_text()
    for value in [*sentinels.values(), "sentinel"]:
        assert value not in text
    assert text == CHECKED_IN.read_text(), "the environment leaked into the compiled pipeline"


def test_caching_flags(documents: list[dict[str, Any]]) -> None:
    """Only the source listing always runs; pretraining takes no per-run parameter (no
    pipeline run id) and, by default, not the labelled data, so an unchanged pool reuses
    its encoder."""
    tasks = _tasks(documents)
    assert set(tasks) == CACHED | NOT_CACHED | {"condition-2", "exit-handler-1"}
    for name in CACHED:
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name
    pretrain_inputs = tasks["pretrain"]["inputs"]["parameters"]
    assert "pipeline_run_id" not in pretrain_inputs
    assert set(pretrain_inputs) == {"pool_hash", "model_config", "config"}
    assert set(tasks["pretrain"]["inputs"]["artifacts"]) == {"pool"}
    for name in NOT_CACHED:
        assert tasks[name]["cachingOptions"] == {}, f"{name} must never come from the cache"


def test_a_passing_run_publishes_the_version_it_registered(documents: list[dict[str, Any]]) -> None:
    """On a cluster the run ends by publishing its Triton repository where the Rollout reads
    it; a local run (kfp.local) serves its own and builds the DAG without the step."""
    publish = _tasks(documents)["publish"]
    inputs = publish["inputs"]
    assert inputs["artifacts"]["repository"]["taskOutputArtifact"] == {
        "outputArtifactKey": "repository",
        "producerTask": "triton-repository",
    }
    assert inputs["parameters"]["version"]["taskOutputParameter"]["producerTask"] == "register"
    assert "rollout_config" in documents[0]["root"]["inputDefinitions"]["parameters"]
    assert "exec-publish" in _platform(documents)  # the S3 Secret, for the object store
    local = build(ClusterSettings(), publish_to_store=False)
    assert "publish" not in local.pipeline_spec.components["comp-condition-2"].dag.tasks


def test_an_exit_handler_closes_the_mlflow_runs_whatever_the_outcome(
    documents: list[dict[str, Any]],
) -> None:
    """Every step runs inside the exit handler's DAG; the exit task runs after it whatever
    its outcome, with its final status and this run's id (the id its MLflow runs carry)."""
    root = documents[0]["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "close-runs"}
    body = documents[0]["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"ingest", "finetune", "evaluate", "gate", "condition-2"} <= set(body)
    closing = root["close-runs"]
    assert closing["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    inputs = closing["inputs"]["parameters"]
    assert inputs["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert inputs["pipeline_run_id"] == body["finetune"]["inputs"]["parameters"]["pipeline_run_id"]
    assert closing["componentRef"]["name"] == "comp-close-runs"


def test_cluster_settings_change_the_compiled_placement(tmp_path: Path) -> None:
    cluster = ClusterSettings.model_validate(
        {
            "gpu_node_selector": {"pool": "a100"},
            "gpu_tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
            "shm_size_gi": 32,
            "s3_secret": "team-s3",
        }
    )
    text = compile_pipeline(tmp_path / "t.yaml", cluster).read_text()
    platform = _platform(list(yaml.safe_load_all(text)))
    config = platform["exec-finetune"]
    assert config["nodeSelector"]["nodeSelectorJson"]["runtimeValue"]["constant"] == {
        "pool": "a100"
    }
    assert config["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ]
    assert config["emptyDirMounts"][0]["sizeLimit"] == "32Gi"
    assert {ref["secretName"] for ref in platform["exec-ingest"]["secretAsEnv"]} == {"team-s3"}


STEP_OF_EXECUTOR = {
    "exec-fingerprint": "fingerprint",
    "exec-fingerprint-2": "fingerprint",
    "exec-ingest": "ingest",
    "exec-ingest-2": "ingest",
    "exec-clahe": "clahe",
    "exec-clahe-2": "clahe",
    "exec-pretrain": "pretrain",
    "exec-finetune": "finetune",
    "exec-export": "export",
    "exec-evaluate": "evaluate",
    "exec-gate": "gate",
    "exec-register": "registration",
    "exec-tensorrt": "tensorrt",
    "exec-triton-repository": "triton_repository",
    "exec-publish": "publish",
    "exec-close-runs": "close_runs",
}
"""Every step's executor and its entry in cluster.steps."""
IMAGE_OF_EXECUTOR = {name: "runtime" for name in STEP_OF_EXECUTOR}
IMAGE_OF_EXECUTOR |= {
    "exec-pretrain": "trainer",
    "exec-finetune": "trainer",
    "exec-export": "trainer",
}
IMAGE_OF_EXECUTOR |= {"exec-tensorrt": "tensorrt"}


def _tasks(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Every task: the root's (the exit handler and its body), the body's, the gate's branch."""
    components = documents[0]["components"]
    tasks = dict(documents[0]["root"]["dag"]["tasks"])
    tasks |= components["comp-exit-handler-1"]["dag"]["tasks"]
    tasks |= components["comp-condition-2"]["dag"]["tasks"]
    return tasks


def _executor_of_task(documents: list[dict[str, Any]]) -> dict[str, str]:
    components = documents[0]["components"]
    return {
        name: components[task["componentRef"]["name"]]["executorLabel"]
        for name, task in _tasks(documents).items()
        if "executorLabel" in components[task["componentRef"]["name"]]
    }


def _assert_steps_placed_as(documents: list[dict[str, Any]], cluster: ClusterSettings) -> None:
    """Each executor's image, CPU, memory, GPUs and deadline, and each task's retries, are
    exactly what `cluster` says for its step."""
    executors = documents[0]["deploymentSpec"]["executors"]
    assert set(executors) == set(STEP_OF_EXECUTOR)
    platform = _platform(documents)
    for name, executor in executors.items():
        step = getattr(cluster.steps, STEP_OF_EXECUTOR[name])
        container = executor["container"]
        assert container["image"] == cluster.image(IMAGE_OF_EXECUTOR[name]), name
        resources = container["resources"]
        assert resources["resourceCpuRequest"] == step.cpu_request, name
        assert resources.get("resourceCpuLimit") == step.cpu_limit, name
        assert resources["resourceMemoryRequest"] == step.memory_request, name
        assert resources.get("resourceMemoryLimit") == step.memory_limit, name
        accelerator = resources.get("accelerator")
        if name in GPU_EXECUTORS:
            assert accelerator["resourceType"] == step.accelerator_type, name
            assert accelerator["resourceCount"] == str(step.gpus), name
        else:
            assert accelerator is None, f"{name} is a CPU step but asks for a GPU"
        assert platform[name]["activeDeadlineSeconds"] == str(step.timeout_s), name
    for task, executor_name in _executor_of_task(documents).items():
        step = getattr(cluster.steps, STEP_OF_EXECUTOR[executor_name])
        policy = _tasks(documents)[task].get("retryPolicy")
        if step.retries:
            assert policy == {
                "maxRetryCount": step.retries,
                "backoffDuration": f"{step.backoff_s}s",
                "backoffFactor": step.backoff_factor,
                "backoffMaxDuration": f"{step.retry_window_s}s",
            }, task
        else:
            assert policy is None, f"{task} must not be retried"


def test_every_step_is_sized_retried_and_timed_by_its_settings(
    documents: list[dict[str, Any]],
) -> None:
    _assert_steps_placed_as(documents, ClusterSettings())


def test_retried_where_a_transient_fault_is_plausible_and_never_the_gate(
    documents: list[dict[str, Any]],
) -> None:
    """Object-store reads (fingerprint, ingest), registry and store writes (register,
    publish), and the hours-long training steps whose pod may be lost; a verdict is not
    retried, and a retry window covers every attempt at its deadline (KFP's default window
    is one hour, counted from the first attempt)."""
    retried = {name for name, task in _tasks(documents).items() if "retryPolicy" in task}
    assert retried == {
        "fingerprint",
        "fingerprint-2",
        "ingest",
        "ingest-2",
        "pretrain",
        "finetune",
        "register",
        "publish",
        "close-runs",
    }
    finetune = _tasks(documents)["finetune"]["retryPolicy"]
    assert int(finetune["backoffMaxDuration"].removesuffix("s")) > 3 * 24 * 3600
    # `drseg run` (kfp.local, which honours retry policies) builds without them: a bad
    # local source fails at once.
    local = build(ClusterSettings(), publish_to_store=False, retry=False).pipeline_spec
    dags = [local.root.dag, *(c.dag for c in local.components.values() if c.HasField("dag"))]
    assert not [name for dag in dags for name, t in dag.tasks.items() if t.HasField("retry_policy")]
    assert len(dags) == 3  # root, the exit handler's body, the gate's branch
    with pytest.raises(ValueError, match="gate's verdict is not a transient fault"):
        ClusterSettings.model_validate({"steps": {"gate": {"retries": 1}}})


def test_changed_step_settings_change_the_compiled_spec(tmp_path: Path) -> None:
    """Through the environment as a cluster operator would set them; a step given in part
    keeps the rest of its own defaults (ingest stays retried)."""
    settings = load_settings(
        environ={
            "DRSEG_CLUSTER__IMAGE_REGISTRY": "registry.example.org:5000/ml/drseg",
            "DRSEG_CLUSTER__IMAGE_TAG": "2026.11.30-abc123",
            "DRSEG_CLUSTER__STEPS__FINETUNE__GPUS": "4",
            "DRSEG_CLUSTER__STEPS__FINETUNE__ACCELERATOR_TYPE": "amd.com/gpu",
            "DRSEG_CLUSTER__STEPS__FINETUNE__TIMEOUT_S": "7200",
            "DRSEG_CLUSTER__STEPS__INGEST__MEMORY_LIMIT": "48Gi",
            "DRSEG_CLUSTER__STEPS__INGEST__CPU_LIMIT": "6",
            "DRSEG_CLUSTER__STEPS__EVALUATE__RETRIES": "1",
            "DRSEG_CLUSTER__STEPS__PUBLISH__RETRIES": "0",
        }
    )
    cluster = settings.cluster
    assert cluster.steps.ingest.retries == 3
    documents = list(yaml.safe_load_all(compile_pipeline(tmp_path / "t.yaml", cluster).read_text()))
    _assert_steps_placed_as(documents, cluster)
    executors = documents[0]["deploymentSpec"]["executors"]
    assert executors["exec-finetune"]["container"]["image"] == (
        "registry.example.org:5000/ml/drseg/trainer:2026.11.30-abc123"
    )
    assert (
        executors["exec-finetune"]["container"]["resources"]["accelerator"]["resourceCount"] == "4"
    )
    assert _platform(documents)["exec-finetune"]["activeDeadlineSeconds"] == "7200"
    assert "retryPolicy" in _tasks(documents)["evaluate"]
    assert "retryPolicy" not in _tasks(documents)["publish"]


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        ({"ingest": {"cpu_request": "2 cores"}}, "not a CPU quantity"),
        ({"ingest": {"memory_limit": "1.5Gi"}}, "not a memory quantity"),
        ({"finetune": {"memory_request": "128Gi"}}, "above memory_limit 64Gi"),
        ({"clahe": {"cpu_request": "4", "cpu_limit": "500m"}}, "above cpu_limit"),
        ({"ingest": {"timeout_s": 0}}, "needs a deadline"),
        ({"tensorrt": {"gpus": 0}}, "greater than or equal to 1"),
        ({"nightly": {}}, "Extra inputs"),
    ],
)
def test_step_settings_are_checked_when_loaded(steps: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ClusterSettings.model_validate({"steps": steps})


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_registry", "ghcr.io/drseg/"), ("image_registry", "GHCR.io"), ("image_tag", "v1 ")],
)
def test_image_settings_are_checked_when_loaded(field: str, value: str) -> None:
    with pytest.raises(ValueError, match="not an image"):
        ClusterSettings.model_validate({field: value})


def test_cluster_settings_refuse_bad_secret_names() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes Secret name"):
        ClusterSettings(s3_secret="Drseg_S3")
    with pytest.raises(ValueError, match="not environment variable names"):
        ClusterSettings(mlflow_secret_env={"password": "MLFLOW-PASSWORD"})


@pytest.mark.parametrize(
    "cron",
    [
        "0 0 3 * * *",
        "0 */15 * * * *",
        "30 0 2 * * MON-FRI",
        "0 0 4 1,15 * ?",
        "@daily",
        "@every 6h",
    ],
)
def test_six_field_cron_is_accepted(cron: str) -> None:
    assert validate_cron(cron) == cron


def test_five_field_cron_is_refused_with_the_six_field_form() -> None:
    with pytest.raises(ClusterError, match=r"six, seconds first") as error:
        validate_cron("0 3 * * *")
    assert "'0 0 3 * * *'" in str(error.value)


@pytest.mark.parametrize(
    ("cron", "problem"),
    [
        ("* * * *", "4 fields"),
        ("0 0 3 * * * 2027", "7 fields"),
        ("60 0 3 * * *", "seconds"),
        ("0 0 24 * * *", "hours"),
        ("0 0 3 0 * *", "day of month"),
        ("0 0 3 * 13 *", "month"),
        ("0 0 3 * * FUNDAY", "day of week"),
        ("0 */0 * * * *", "step"),
        ("@sometimes", "unknown descriptor"),
    ],
)
def test_wrong_cron_is_refused(cron: str, problem: str) -> None:
    with pytest.raises(ClusterError, match=problem):
        validate_cron(cron)


# --- submit and schedule against a recording HTTP server ------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Answers like the KFP v2beta1 API, just enough for kfp.Client, and records requests."""

    requests: ClassVar[list[tuple[str, str, Any]]] = []

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.requests.append((method, self.path, body))
        path = self.path.split("?")[0]
        answer: dict[str, Any] = {}
        if path.endswith("/healthz"):
            answer = {"multi_user": False}
        elif path.endswith("/experiments") and method == "GET":
            answer = {"experiments": [{"experiment_id": "exp-1", "display_name": "drseg-training"}]}
        elif path.endswith("/runs"):
            answer = {"run_id": "run-1", "display_name": body["display_name"]}
        elif path.endswith("/recurringruns"):
            answer = {"recurring_run_id": "job-1", "display_name": body["display_name"]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_api() -> Iterator[tuple[str, list[tuple[str, str, Any]]]]:
    recorded: list[tuple[str, str, Any]] = []
    handler = type("Handler", (_Recorder,), {"requests": recorded})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorded
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def settings() -> Settings:
    return load_settings(environ={"DRSEG_FINETUNE__MAX_STEPS": "7"})


def _posted(recorded: list[tuple[str, str, Any]], suffix: str) -> Any:
    bodies = [body for method, path, body in recorded if method == "POST" and path.endswith(suffix)]
    assert len(bodies) == 1, recorded
    return bodies[0]


def test_submit_creates_a_run_with_the_settings(
    kfp_api: tuple[str, list[tuple[str, str, Any]]], settings: Settings
) -> None:
    host, recorded = kfp_api
    run_id = submit(
        settings, "s3://fundus/idrid", "s3://fundus/pool", "nightly", ClusterSettings(kfp_host=host)
    )
    assert run_id == "run-1"
    run = _posted(recorded, "/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-1"
    assert run["display_name"] == "nightly"
    expected = pipeline_arguments(settings, "s3://fundus/idrid", "s3://fundus/pool")
    assert run["runtime_config"]["parameters"] == expected
    assert json.loads(expected["finetune_config"])["max_steps"] == 7
    # Both documents travel: the DAG and the Kubernetes settings (GPU nodes, Secrets).
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "drseg-training"
    executors = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) >= GPU_EXECUTORS


def test_schedule_creates_a_recurring_run_on_a_six_field_cron(
    kfp_api: tuple[str, list[tuple[str, str, Any]]], settings: Settings
) -> None:
    host, recorded = kfp_api
    job_id = schedule(
        settings,
        "s3://fundus/idrid",
        "s3://fundus/pool",
        "0 0 3 * * SUN",
        "weekly",
        ClusterSettings(kfp_host=host),
    )
    assert job_id == "job-1"
    job = _posted(recorded, "/apis/v2beta1/recurringruns")
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * SUN"
    assert job["display_name"] == "weekly"
    assert job["experiment_id"] == "exp-1"
    assert int(job["max_concurrency"]) == 1
    assert job["runtime_config"]["parameters"]["source"] == "s3://fundus/idrid"


def test_schedule_refuses_five_fields_before_calling_the_cluster(
    kfp_api: tuple[str, list[tuple[str, str, Any]]], settings: Settings
) -> None:
    host, recorded = kfp_api
    with pytest.raises(ClusterError, match="0 0 3 \\* \\* \\*"):
        schedule(settings, "s3://a", "s3://b", "0 3 * * *", cluster=ClusterSettings(kfp_host=host))
    assert recorded == []


def test_submit_without_a_host_names_the_setting(settings: Settings) -> None:
    with pytest.raises(ClusterError, match=r"cluster\.kfp_host is not set"):
        submit(settings, "s3://a", "s3://b", cluster=ClusterSettings())


def test_pretrain_refuses_a_labelled_setting_its_pipeline_was_not_built_with(
    tmp_path: Path,
) -> None:
    """pretrain.include_labelled is fixed when the pipeline is built; a run parameter that
    says otherwise must fail loudly, not pretrain silently on the pool alone."""
    from components.pretrain import pretrain
    from kfp.dsl import Dataset, Model

    with pytest.raises(ValueError, match="recompile"):
        pretrain.python_func(
            pool=Dataset(uri=str(tmp_path / "pool")),
            pool_hash="h",
            model_config=ModelSettings().model_dump_json(),
            config=PretrainSettings(include_labelled=True).model_dump_json(),
            encoder=Model(uri=str(tmp_path / "encoder")),
        )
