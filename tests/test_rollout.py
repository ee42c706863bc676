"""Canary rollout state machine, against an in-memory `Cluster`.

No kube-apiserver can run here (see STACK.md), and kmock ignores label selectors and fills no
status, so a fake with a tiny "controller" (ready or never-ready) drives the logic instead;
the Kubernetes client itself is only checked for which calls (verbs) it makes.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from drseg import rollout
from drseg.rollout import (
    Cluster,
    KubeCluster,
    RolloutAborted,
    RolloutError,
    RolloutSettings,
    TrackMetrics,
)

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "manifests" / "base"
ANNOTATION = "drseg.io/rollout-state"


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a.get(k), v) for k, v in b.items()}}
    return copy.deepcopy(b)


class FakeCluster:
    """Deployments in a dict; a get() plays the controller: ready pods = replicas, or none."""

    def __init__(self, ready: bool = True) -> None:
        stable = yaml.safe_load((BASE / "triton-deployment.yaml").read_text())
        stable["metadata"]["labels"]["track"] = "stable"
        self.deployments: dict[str, dict[str, Any]] = {"triton": stable}
        self.service = yaml.safe_load((BASE / "triton-service.yaml").read_text())
        self.ready = ready
        self.writes = 0

    def get_deployment(self, name: str) -> dict[str, Any] | None:
        d = self.deployments.get(name)
        if d is None:
            return None
        d = copy.deepcopy(d)
        gen = d["metadata"].setdefault("generation", 1)
        n = d["spec"].get("replicas", 1) if self.ready else 0
        d["status"] = {"readyReplicas": n, "observedGeneration": gen}
        return d

    def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        assert body["metadata"]["name"] not in self.deployments
        self.writes += 1
        self.deployments[body["metadata"]["name"]] = copy.deepcopy(body)
        return body

    def patch_deployment(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.writes += 1
        d = _merge(self.deployments[name], patch)
        d["metadata"]["generation"] = d["metadata"].get("generation", 1) + ("spec" in patch)
        self.deployments[name] = d
        return copy.deepcopy(d)

    def list_pods(self, selector: str) -> list[dict[str, Any]]:
        return []

    def read_service(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.service)


def settings(**kw: Any) -> RolloutSettings:
    return RolloutSettings(total_replicas=4, ready_timeout_s=3, poll_s=1, **kw)


class Clock:
    """Fake time: sleep() advances it, so timeouts take no real time."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def metrics(fail: float = 0.0, latency: float = 100.0) -> rollout.MetricsFn:
    def fn(cluster: Cluster, s: RolloutSettings) -> tuple[TrackMetrics, TrackMetrics]:
        return TrackMetrics(1000, 0, 0, 100.0), TrackMetrics(
            1000 * (1 - fail), 1000 * fail, 0, latency
        )

    return fn


def run_start(cluster: FakeCluster, version: int = 7, **kw: Any) -> rollout.State:
    clock = Clock()
    defaults: dict[str, Any] = {"metrics": metrics(), "agreement": lambda s: 0.99}
    return rollout.start(
        cluster,
        kw.pop("settings", settings()),
        version,
        clock=clock,
        sleep=clock.sleep,
        **{**defaults, **kw},
    )


def state(cluster: FakeCluster) -> dict[str, Any]:
    return dict(
        json.loads(cluster.deployments["triton-canary"]["metadata"]["annotations"][ANNOTATION])
    )


def env(d: dict[str, Any]) -> dict[str, str]:
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in c.get("env", [])}


def test_start_then_promote_moves_stable_and_champion() -> None:
    cluster = FakeCluster()
    assert run_start(cluster).status == "ready"
    canary = cluster.deployments["triton-canary"]
    assert canary["spec"]["replicas"] == 2  # ceil(0.5 * 4)
    assert canary["spec"]["selector"]["matchLabels"]["track"] == "canary"
    assert canary["spec"]["template"]["metadata"]["labels"]["track"] == "canary"
    assert env(canary)["MODEL_REPOSITORY_S3_URI"] == "s3://drseg-models/triton/7"
    assert "env" not in cluster.deployments["triton"]["spec"]["template"]["spec"]["containers"][0]
    moved: list[tuple[str, str]] = []
    rollout.promote(cluster, settings(), lambda v, r: moved.append((v, r)))
    assert moved and moved[0][0] == "7"
    stable = cluster.deployments["triton"]
    assert env(stable)["MODEL_REPOSITORY_S3_URI"] == "s3://drseg-models/triton/7"
    assert stable["spec"]["template"]["metadata"]["labels"]["drseg.io/model-version"] == "7"
    assert stable["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "triton"}}
    assert cluster.deployments["triton-canary"]["spec"]["replicas"] == 0
    assert state(cluster)["status"] == "promoted"
    # Re-running is safe: start is a no-op, promote only re-asserts the (idempotent) alias.
    writes = cluster.writes
    assert run_start(cluster).status == "promoted"
    rollout.promote(cluster, settings(), lambda v, r: moved.append((v, r)))
    assert cluster.writes == writes and len(moved) == 2


def test_promote_with_real_registry_promote_signature() -> None:
    """registry.promote(client_or_uri, name, version, reason=...) wraps into a PromoteFn."""
    from drseg import registry

    params = inspect.signature(registry.promote).parameters
    assert list(params)[:3] == ["client", "name", "version"] and "reason" in params


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"ready": False}, "canary not ready: 0/1"),
        ({"metrics": metrics(fail=0.2)}, "failure rate"),
        ({"metrics": metrics(latency=500.0)}, "latency"),
        ({"agreement": lambda s: 0.5}, "agreement Dice 0.5000"),
    ],
)
def test_failed_check_aborts_and_leaves_stable(kw: dict[str, Any], why: str) -> None:
    cluster = FakeCluster(ready=kw.pop("ready", True))
    before = copy.deepcopy(cluster.deployments["triton"])
    with pytest.raises(RolloutAborted, match=why):
        run_start(cluster, **kw)
    assert cluster.deployments["triton"] == before
    assert cluster.deployments["triton-canary"]["spec"]["replicas"] == 0
    recorded = state(cluster)
    assert recorded["status"] == "aborted" and why in recorded["reason"]
    with pytest.raises(RolloutError, match="--retry"):
        run_start(cluster, **kw)
    with pytest.raises(RolloutError, match="nothing to promote"):
        rollout.promote(cluster, settings(), lambda v, r: None)


def test_resume_after_interruption_continues_from_recorded_step() -> None:
    cluster = FakeCluster()
    calls: list[int] = []

    def flaky(cluster: Cluster, s: RolloutSettings) -> tuple[TrackMetrics, TrackMetrics]:
        calls.append(len(calls))
        if len(calls) == 2:
            raise ConnectionError("scrape interrupted")
        return metrics()(cluster, s)

    with pytest.raises(ConnectionError):
        run_start(cluster, metrics=flaky)
    assert state(cluster) == {"version": "7", "step": 1, "status": "progressing", "reason": ""}
    assert run_start(cluster, metrics=flaky).status == "ready"
    assert len(calls) == 3  # step 0 was not analysed again
    with pytest.raises(RolloutError, match="version 7 is ready"):
        run_start(cluster, version=8)


def test_dry_run_prints_diff_and_changes_nothing() -> None:
    cluster = FakeCluster()
    out = io.StringIO()
    run_start(cluster, dry_run=True, out=out)
    assert "triton-canary" not in cluster.deployments and cluster.writes == 0
    assert "+++ triton-canary (planned)" in out.getvalue()
    assert "+          value: s3://drseg-models/triton/7" in out.getvalue()

    run_start(cluster)
    writes, out = cluster.writes, io.StringIO()
    rollout.promote(
        cluster,
        settings(),
        lambda v, r: pytest.fail("dry run moved @champion"),
        dry_run=True,
        out=out,
    )
    assert cluster.writes == writes
    text = out.getvalue()
    assert "--- triton (cluster)" in text and "+          value: s3://drseg-models/triton/7" in text
    assert "-  replicas: 2\n+  replicas: 0" in text


def test_abort_is_idempotent_and_refuses_after_promote() -> None:
    cluster = FakeCluster()
    assert rollout.abort(cluster, settings()) is None  # no canary: nothing to do
    run_start(cluster)
    aborted = rollout.abort(cluster, settings(), "bad scans")
    assert aborted is not None and aborted.status == "aborted"
    assert rollout.status(cluster, settings())["reason"] == "bad scans"
    rollout.abort(cluster, settings(), "bad scans")
    assert cluster.deployments["triton-canary"]["spec"]["replicas"] == 0


def test_service_selecting_track_is_refused() -> None:
    cluster = FakeCluster()
    cluster.service["spec"]["selector"]["track"] = "stable"
    with pytest.raises(RolloutError, match="no traffic"):
        run_start(cluster)


SAMPLE = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="drseg",version="1"} 90
nv_inference_request_success{model="other",version="1"} 10
nv_inference_request_failure{model="drseg",reason="BACKEND",version="1"} 5
nv_inference_request_failure{model="drseg",reason="REJECTED",version="1"} 5
nv_inference_request_duration_us{model="drseg",version="1"} 2.5e6
nv_inference_request_summary_us{model="drseg",version="1",quantile="0.5"} 20000
nv_inference_request_summary_us{model="drseg",version="1",quantile="0.99"} 80000
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
"""


def test_parse_triton_metrics() -> None:
    m = rollout.parse_triton_metrics(SAMPLE)
    assert (m.success, m.failure, m.duration_us, m.p99_us) == (100, 10, 2.5e6, 80000)
    assert m.failure_rate == pytest.approx(10 / 110)
    assert m.latency_us == 80000
    no_summary = rollout.parse_triton_metrics(SAMPLE.replace("summary", "x"))
    assert no_summary.latency_us == 25000  # mean from the duration counter


def test_scrape_metrics_sums_running_pods_per_track() -> None:
    cluster = FakeCluster()
    run_start(cluster)
    selectors: list[str] = []

    def pods(selector: str) -> list[dict[str, Any]]:
        selectors.append(selector)
        return [
            {"status": {"podIP": "10.0.0.1", "phase": "Running"}},
            {"status": {"podIP": "10.0.0.2", "phase": "Pending"}},
        ]

    cluster.list_pods = pods  # type: ignore[method-assign]
    urls: list[str] = []

    def fetch(url: str) -> str:
        urls.append(url)
        return SAMPLE

    stable, canary = rollout.scrape_metrics(cluster, settings(), fetch)
    assert stable.success == canary.success == 100
    assert urls == ["http://10.0.0.1:8002/metrics"] * 2
    assert selectors == [
        "app.kubernetes.io/name=triton,track!=canary",
        "app.kubernetes.io/name=triton,track=canary",
    ]


# --- least privilege ---------------------------------------------------------------------

_VERBS = {
    "read": "get",
    "create": "create",
    "patch": "patch",
    "list": "list",
    "delete": "delete",
    "replace": "update",
    "watch": "watch",
    "delete_collection": "deletecollection",
}


class Recorder:
    """Stands in for AppsV1Api / CoreV1Api: records each call as (apiGroup, resource, verb)."""

    def __init__(self, group: str, calls: set[tuple[str, str, str]]) -> None:
        self.group, self.calls = group, calls

    def __getattr__(self, method: str) -> Any:
        from kubernetes import client

        verb, _, rest = method.partition("_namespaced_")
        self.calls.add((self.group, rest + "s", _VERBS[verb]))
        replies = {
            "deployment": client.V1Deployment(metadata=client.V1ObjectMeta(name="x")),
            "pod": client.V1PodList(items=[client.V1Pod()]),
            "service": client.V1Service(),
        }
        return lambda *a, **kw: replies[rest]


def _granted() -> set[tuple[str, str, str]]:
    role = yaml.safe_load((BASE / "rollout-role.yaml").read_text())
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_cluster_calls_are_within_the_role_and_every_rule_is_used() -> None:
    protocol = {n for n in vars(Cluster) if not n.startswith("_")}
    implemented = {
        n for n, _ in inspect.getmembers(KubeCluster, inspect.isfunction) if not n.startswith("_")
    }
    assert implemented - {"from_environment"} == protocol
    calls: set[tuple[str, str, str]] = set()
    kube = KubeCluster(Recorder("apps", calls), Recorder("", calls), "ns")
    kube.get_deployment("triton")
    kube.create_deployment({})
    kube.patch_deployment("triton", {})
    kube.list_pods("a=b")
    kube.read_service("triton")
    assert calls <= _granted(), calls - _granted()
    role = yaml.safe_load((BASE / "rollout-role.yaml").read_text())
    for rule in role["rules"]:
        assert any(g in rule["apiGroups"] and r in rule["resources"] for g, r, _ in calls), rule
    assert ("apps", "deployments", "delete") not in calls  # promote scales to 0 instead
