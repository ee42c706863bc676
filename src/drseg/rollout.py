"""Canary rollout of a Triton model version on Kubernetes, then promotion in MLflow.

The rollout is a small state machine recorded as a JSON annotation on the canary Deployment
(version, step, status, reason), so every command can be re-run after an interruption and
continues from what the cluster says, not from local memory. All cluster access goes through
`Cluster`, whose calls are exactly those that manifests/base/rollout-role.yaml grants.

Statuses: ``progressing`` (walking the traffic steps), ``ready`` (every step passed, waiting
for promote), ``promoted``, ``aborted``.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TextIO

import yaml
from pydantic import Field, field_validator

from drseg.config import Section

REPOSITORY_ENV = "MODEL_REPOSITORY_S3_URI"
VERSION_LABEL = "drseg.io/model-version"
TRACK_LABEL = "track"

Obj = dict[str, Any]


class RolloutSettings(Section):
    namespace: str = "default"
    stable: str = "triton"
    canary: str = "triton-canary"
    service: str = "triton"
    """The shared Service; its selector must match canary pods or the canary gets no traffic."""
    container: str = "triton"
    repository_uri: str = "s3://drseg-models/triton/{version}"
    """Model repository of a version; ``{version}`` is replaced by the version number."""
    steps: tuple[float, ...] = (0.1, 0.5)
    """Canary replicas as a share of total_replicas, in order. Stable is never scaled before
    promote, so an abort leaves it exactly as it was."""
    total_replicas: int = Field(2, ge=1)
    ready_timeout_s: float = Field(900.0, gt=0)
    """Loading TensorRT plans from S3 can take minutes (see the startup probe)."""
    poll_s: float = Field(5.0, gt=0)
    max_failure_rate_diff: float = Field(0.01, ge=0)
    max_p99_ratio: float = Field(1.5, gt=0)
    min_dice_agreement: float = Field(0.95, ge=0, le=1)
    metrics_port: int = 8002
    state_annotation: str = "drseg.io/rollout-state"

    @field_validator("steps")
    @classmethod
    def _increasing_shares(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 < s <= 1 for s in value) or list(value) != sorted(value):
            raise ValueError(f"steps must be increasing shares in (0, 1], got {value}")
        return value

    def canary_replicas(self, step: int) -> int:
        return max(1, math.ceil(self.steps[step] * self.total_replicas))


class RolloutError(RuntimeError):
    """A command cannot go on; the message says what to do."""


class RolloutAborted(RolloutError):
    """A check failed: the canary was scaled to 0 and the reason recorded on it."""


class Cluster(Protocol):
    """Exactly the Kubernetes calls the rollout makes (a test checks them against the Role)."""

    def get_deployment(self, name: str) -> Obj | None: ...
    def create_deployment(self, body: Obj) -> Obj: ...
    def patch_deployment(self, name: str, patch: Obj) -> Obj: ...
    def list_pods(self, selector: str) -> list[Obj]: ...
    def read_service(self, name: str) -> Obj: ...


class KubeCluster:
    """`Cluster` over the kubernetes client; objects are plain dicts in API (camelCase) form."""

    def __init__(self, apps: Any, core: Any, namespace: str) -> None:
        from kubernetes.client import ApiClient

        self.apps, self.core, self.namespace = apps, core, namespace
        self._api = ApiClient()

    @classmethod
    def from_environment(cls, namespace: str) -> KubeCluster:
        """In-cluster service account first (the drseg-rollout Role), else ~/.kube/config."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.AppsV1Api(), client.CoreV1Api(), namespace)

    def _dict(self, obj: Any) -> Obj:
        out: Obj = self._api.sanitize_for_serialization(obj)
        return out

    def get_deployment(self, name: str) -> Obj | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._dict(self.apps.read_namespaced_deployment(name, self.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_deployment(self, body: Obj) -> Obj:
        return self._dict(self.apps.create_namespaced_deployment(self.namespace, body))

    def patch_deployment(self, name: str, patch: Obj) -> Obj:
        # A dict body goes as a strategic merge patch: containers and env merge by name.
        return self._dict(self.apps.patch_namespaced_deployment(name, self.namespace, patch))

    def list_pods(self, selector: str) -> list[Obj]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        return [self._dict(p) for p in pods.items]

    def read_service(self, name: str) -> Obj:
        return self._dict(self.core.read_namespaced_service(name, self.namespace))


@dataclass(frozen=True)
class State:
    version: str
    step: int = 0
    """Traffic steps completed (analysis passed)."""
    status: str = "progressing"
    reason: str = ""


@dataclass(frozen=True)
class TrackMetrics:
    """Triton request counters summed over one track's pods."""

    success: float = 0.0
    failure: float = 0.0
    duration_us: float = 0.0
    p99_us: float | None = None

    @property
    def failure_rate(self) -> float:
        total = self.success + self.failure
        return self.failure / total if total else 0.0

    @property
    def latency_us(self) -> float:
        """p99 where Triton exports the summary, else the mean (duration_us is a counter)."""
        if self.p99_us is not None:
            return self.p99_us
        return self.duration_us / self.success if self.success else 0.0


MetricsFn = Callable[["Cluster", RolloutSettings], tuple[TrackMetrics, TrackMetrics]]
"""Returns (stable, canary) metrics."""
AgreementFn = Callable[[RolloutSettings], float]
"""Mean Dice between stable's and canary's masks on the fixed probe set."""
PromoteFn = Callable[[str, str], None]
"""(version, reason): moves the MLflow @champion alias, e.g. via drseg.registry.promote."""
Clock = Callable[[], float]
Sleep = Callable[[float], None]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_triton_metrics(text: str) -> TrackMetrics:
    """Sum Triton's request counters over models in Prometheus text format (one pod)."""
    sums = {"success": 0.0, "failure": 0.0, "duration": 0.0}
    names = {
        "nv_inference_request_success": "success",
        "nv_inference_request_failure": "failure",
        "nv_inference_request_duration_us": "duration",
    }
    p99: float | None = None
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match:
            continue
        name, labels = match.group(1), dict(_LABEL.findall(match.group(3) or ""))
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        if name in names:
            sums[names[name]] += value
        elif (
            name == "nv_inference_request_summary_us"
            and labels.get("quantile") == "0.99"
            and not math.isnan(value)
        ):
            p99 = value if p99 is None else max(p99, value)
    return TrackMetrics(sums["success"], sums["failure"], sums["duration"], p99)


def _sum(parts: list[TrackMetrics]) -> TrackMetrics:
    p99s = [p.p99_us for p in parts if p.p99_us is not None]
    return TrackMetrics(
        sum(p.success for p in parts),
        sum(p.failure for p in parts),
        sum(p.duration_us for p in parts),
        max(p99s) if p99s else None,
    )


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def _selector(labels: Mapping[str, str], extra: str = "") -> str:
    return ",".join([*(f"{k}={v}" for k, v in sorted(labels.items())), *([extra] if extra else [])])


def scrape_metrics(
    cluster: Cluster, settings: RolloutSettings, fetch: Callable[[str], str] = _fetch
) -> tuple[TrackMetrics, TrackMetrics]:
    """Real `MetricsFn`: each running pod's :8002/metrics, summed per track."""
    out = []
    for name, extra in ((settings.stable, f"{TRACK_LABEL}!=canary"), (settings.canary, "")):
        deployment = _require(cluster, name)
        labels = deployment["spec"]["selector"].get("matchLabels", {})
        parts = []
        for pod in cluster.list_pods(_selector(labels, extra)):
            ip = pod.get("status", {}).get("podIP")
            if ip and pod.get("status", {}).get("phase") == "Running":
                parts.append(
                    parse_triton_metrics(fetch(f"http://{ip}:{settings.metrics_port}/metrics"))
                )
        out.append(_sum(parts))
    return out[0], out[1]


def _require(cluster: Cluster, name: str) -> Obj:
    deployment = cluster.get_deployment(name)
    if deployment is None:
        raise RolloutError(
            f"Deployment {name!r} not found; apply the stable overlay (manifests/overlays) "
            "or set rollout.namespace / rollout.stable"
        )
    return deployment


def read_state(deployment: Obj | None, settings: RolloutSettings) -> State | None:
    if deployment is None:
        return None
    raw = (deployment.get("metadata", {}).get("annotations") or {}).get(settings.state_annotation)
    return State(**json.loads(raw)) if raw else None


def _state_patch(state: State, settings: RolloutSettings) -> Obj:
    return {"metadata": {"annotations": {settings.state_annotation: json.dumps(asdict(state))}}}


def _set_env(template: Obj, container: str, value: str) -> None:
    for c in template["spec"]["containers"]:
        if c["name"] == container:
            env = [e for e in c.get("env") or [] if e["name"] != REPOSITORY_ENV]
            c["env"] = [*env, {"name": REPOSITORY_ENV, "value": value}]
            return
    raise RolloutError(f"no container {container!r} in the pod template; set rollout.container")


def _versioned(deployment: Obj, settings: RolloutSettings, version: str) -> Obj:
    """`deployment` pointed at `version`: repository env and version labels."""
    out = copy.deepcopy(deployment)
    template = out["spec"]["template"]
    _set_env(template, settings.container, settings.repository_uri.format(version=version))
    template.setdefault("metadata", {}).setdefault("labels", {})[VERSION_LABEL] = version
    out.setdefault("metadata", {}).setdefault("labels", {})[VERSION_LABEL] = version
    return out


def desired_canary(stable: Obj, settings: RolloutSettings, state: State, replicas: int) -> Obj:
    """The canary: stable's spec with track=canary, the new repository and `replicas`."""
    spec = copy.deepcopy(stable["spec"])
    spec["replicas"] = replicas
    spec["selector"].setdefault("matchLabels", {})[TRACK_LABEL] = "canary"
    spec["template"].setdefault("metadata", {}).setdefault("labels", {})[TRACK_LABEL] = "canary"
    labels = {**(stable["metadata"].get("labels") or {}), TRACK_LABEL: "canary"}
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": settings.canary, "namespace": settings.namespace, "labels": labels},
        "spec": spec,
    }
    body = _versioned(body, settings, state.version)
    body["metadata"]["annotations"] = _state_patch(state, settings)["metadata"]["annotations"]
    return body


def _view(deployment: Obj | None) -> str:
    if deployment is None:
        return ""
    meta = deployment.get("metadata", {})
    keep = {k: meta[k] for k in ("name", "labels", "annotations") if meta.get(k)}
    return yaml.safe_dump(
        {"metadata": keep, "spec": deployment.get("spec")}, sort_keys=True, width=1000
    )


def _diff(name: str, before: Obj | None, after: Obj | None) -> str:
    return "".join(
        difflib.unified_diff(
            _view(before).splitlines(keepends=True),
            _view(after).splitlines(keepends=True),
            f"{name} (cluster)",
            f"{name} (planned)",
        )
    )


def _merged(deployment: Obj, patch: Obj) -> Obj:
    """What a patch would give, for the dry-run diff (dicts merge, lists are replaced)."""

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return copy.deepcopy(b)

    out: Obj = merge(deployment, patch)
    return out


class _Apply:
    """Applies patches, or with dry_run writes their diffs and changes nothing."""

    def __init__(self, cluster: Cluster, dry_run: bool, out: TextIO) -> None:
        self.cluster, self.dry_run, self.out = cluster, dry_run, out

    def create(self, body: Obj) -> None:
        if self.dry_run:
            self.out.write(_diff(body["metadata"]["name"], None, body))
        else:
            self.cluster.create_deployment(body)

    def patch(self, current: Obj, patch: Obj) -> None:
        name = current["metadata"]["name"]
        if self.dry_run:
            self.out.write(_diff(name, current, _merged(current, patch)))
        else:
            self.cluster.patch_deployment(name, patch)


def _scale_patch(replicas: int) -> Obj:
    return {"spec": {"replicas": replicas}}


def _check_service(cluster: Cluster, settings: RolloutSettings, canary: Obj) -> None:
    selector = cluster.read_service(settings.service)["spec"].get("selector") or {}
    labels = canary["spec"]["template"]["metadata"]["labels"]
    missing = {k: v for k, v in selector.items() if labels.get(k) != v}
    if missing:
        raise RolloutError(
            f"Service {settings.service!r} selects {missing}, which canary pods lack: the "
            "canary would get no traffic. Drop those keys from the Service selector."
        )


def _wait_ready(
    cluster: Cluster, settings: RolloutSettings, replicas: int, clock: Clock, sleep: Sleep
) -> str | None:
    """None once `replicas` canary pods are ready, else why not by the timeout."""
    deadline = clock() + settings.ready_timeout_s
    while True:
        current = _require(cluster, settings.canary)
        status = current.get("status") or {}
        ready = status.get("readyReplicas") or 0
        generation = current["metadata"].get("generation")
        observed = status.get("observedGeneration")
        fresh = generation is None or (observed is not None and observed >= generation)
        if fresh and ready >= replicas:
            return None
        if clock() >= deadline:
            return (
                f"canary not ready: {ready}/{replicas} replicas ready after "
                f"{settings.ready_timeout_s:g}s; see `kubectl describe pods -l track=canary`"
            )
        sleep(settings.poll_s)


def _analyse(
    cluster: Cluster, settings: RolloutSettings, metrics: MetricsFn, agreement: AgreementFn
) -> str | None:
    """None when the canary is as good as stable, else the failed check."""
    stable, canary = metrics(cluster, settings)
    diff = canary.failure_rate - stable.failure_rate
    if diff > settings.max_failure_rate_diff:
        return (
            f"failure rate {canary.failure_rate:.4f} vs stable {stable.failure_rate:.4f} "
            f"(+{diff:.4f} > {settings.max_failure_rate_diff})"
        )
    if stable.latency_us > 0 and canary.latency_us / stable.latency_us > settings.max_p99_ratio:
        return (
            f"latency {canary.latency_us:.0f}us vs stable {stable.latency_us:.0f}us "
            f"(ratio > {settings.max_p99_ratio})"
        )
    dice = agreement(settings)
    if dice < settings.min_dice_agreement:
        return f"output agreement Dice {dice:.4f} < {settings.min_dice_agreement}"
    return None


def abort(
    cluster: Cluster,
    settings: RolloutSettings,
    reason: str = "aborted by operator",
    *,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
) -> State | None:
    """Scale the canary to 0 and record why; stable is not touched. Safe to repeat."""
    canary = cluster.get_deployment(settings.canary)
    state = read_state(canary, settings)
    if canary is None or state is None:
        return None
    if state.status == "promoted":
        raise RolloutError(
            f"version {state.version} is already promoted; roll back with `drseg rollout start` "
            "of the previous version instead"
        )
    new = State(state.version, state.step, "aborted", reason)
    _Apply(cluster, dry_run, out).patch(canary, {**_scale_patch(0), **_state_patch(new, settings)})
    return new


def start(
    cluster: Cluster,
    settings: RolloutSettings,
    version: int | str,
    metrics: MetricsFn,
    agreement: AgreementFn,
    *,
    retry: bool = False,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> State:
    """Create or update the canary for `version` and walk the traffic steps.

    Resumes from the step recorded on the canary. A failed check aborts (canary to 0, reason
    recorded) and raises `RolloutAborted`. With dry_run, prints the next change only.
    """
    version = str(version)
    stable = _require(cluster, settings.stable)
    canary = cluster.get_deployment(settings.canary)
    state = read_state(canary, settings)
    if state is not None and state.version == version:
        if state.status == "promoted" or (
            state.status == "ready" and state.step >= len(settings.steps)
        ):
            return state
        if state.status == "aborted" and not retry:
            raise RolloutError(
                f"version {version} was aborted ({state.reason}); fix the cause and pass "
                "--retry to start again from the first step"
            )
    elif state is not None and state.status in ("progressing", "ready"):
        raise RolloutError(
            f"a rollout of version {state.version} is {state.status}; "
            "`drseg rollout promote` or `abort` it first"
        )
    if state is None or state.version != version or state.status == "aborted":
        state = State(version)
    apply = _Apply(cluster, dry_run, out)
    for step in range(state.step, len(settings.steps)):
        replicas = settings.canary_replicas(step)
        body = desired_canary(stable, settings, state, replicas)
        _check_service(cluster, settings, body)
        if canary is None:
            apply.create(body)
        else:
            apply.patch(canary, {"metadata": body["metadata"], "spec": body["spec"]})
        if dry_run:
            return state
        canary = _require(cluster, settings.canary)
        reason = _wait_ready(cluster, settings, replicas, clock, sleep)
        reason = reason or _analyse(cluster, settings, metrics, agreement)
        if reason:
            abort(cluster, settings, f"step {step} ({settings.steps[step]:g}): {reason}")
            raise RolloutAborted(
                f"canary of version {version} aborted at step {step}: {reason}. "
                "Stable is unchanged; fix the model or thresholds (rollout.*) and retry."
            )
        done = step + 1 == len(settings.steps)
        state = State(version, step + 1, "ready" if done else "progressing")
        cluster.patch_deployment(settings.canary, _state_patch(state, settings))
        canary = _require(cluster, settings.canary)
    return state


def promote(
    cluster: Cluster,
    settings: RolloutSettings,
    promote_champion: PromoteFn,
    *,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
) -> State:
    """Stable takes the canary's version, the canary goes to 0, then MLflow @champion moves.

    The canary is scaled to 0, not deleted: the Role grants no delete. Re-running after a
    crash repeats only what is missing (registry.promote is idempotent).
    """
    canary = cluster.get_deployment(settings.canary)
    state = read_state(canary, settings)
    if canary is None or state is None or state.status not in ("ready", "promoted"):
        status = "no rollout" if state is None else f"{state.status} ({state.reason})"
        raise RolloutError(
            f"nothing to promote: {status}; run `drseg rollout start --version N` to the end first"
        )
    if state.status == "ready":
        stable = _require(cluster, settings.stable)
        target = _versioned(stable, settings, state.version)
        patch = {
            "metadata": {"labels": target["metadata"]["labels"]},
            "spec": {"template": target["spec"]["template"]},
        }
        apply = _Apply(cluster, dry_run, out)
        apply.patch(stable, patch)
        new = State(state.version, state.step, "promoted")
        apply.patch(canary, {**_scale_patch(0), **_state_patch(new, settings)})
        if dry_run:
            return state
        state = new
    if not dry_run:
        promote_champion(state.version, f"canary rollout passed {len(settings.steps)} steps")
    return state


def status(cluster: Cluster, settings: RolloutSettings) -> Obj:
    """The recorded state plus the canary's replica counts, as printable JSON."""
    canary = cluster.get_deployment(settings.canary)
    state = read_state(canary, settings)
    if canary is None or state is None:
        return {"status": "none"}
    counts = canary.get("status") or {}
    return {
        **asdict(state),
        "replicas": canary["spec"].get("replicas", 0),
        "readyReplicas": counts.get("readyReplicas") or 0,
    }
