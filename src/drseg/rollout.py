"""Canary rollout of a Triton model version on Kubernetes, then promotion in MLflow.

The rollout is a small state machine recorded as a JSON annotation on the canary Deployment
(version, step, status, reason), so every command can be re-run after an interruption and
continues from what the cluster says, not from local memory. All cluster access goes through
`Cluster`, whose calls are exactly those that manifests/base/rollout-role.yaml grants (plus
manifests/overlays/istio/rollout-role-istio.yaml when rollout.virtual_service is set).

Traffic: by default the shared Service spreads requests over both tracks' pods, so the canary's
share is its share of the replicas. With an Istio VirtualService named in the settings, each
step sets the stable and canary route weights instead; abort and promote set them back to
100/0 before the canary is scaled to 0.

Statuses: ``progressing`` (walking the traffic steps), ``ready`` (every step passed, waiting
for promote), ``promoted``, ``aborted``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import yaml

from drseg.config import RolloutSettings, Settings

if TYPE_CHECKING:
    from drseg.contract import ServingContract
    from drseg.serving.agreement import ContractFn

REPOSITORY_ENV = "MODEL_REPOSITORY_S3_URI"
VERSION_LABEL = "drseg.io/model-version"
TRACK_LABEL = "track"
ISTIO = ("networking.istio.io", "v1beta1", "virtualservices")
"""(group, version, plural) of the Istio VirtualService."""

Obj = dict[str, Any]


class RolloutError(RuntimeError):
    """A command cannot go on; the message says what to do."""


class RolloutAborted(RolloutError):
    """A check failed: the canary was scaled to 0 and the reason recorded on it."""


class Cluster(Protocol):
    """Exactly the Kubernetes calls the rollout makes (a test checks them against the Roles)."""

    def get_deployment(self, name: str) -> Obj | None: ...
    def create_deployment(self, body: Obj) -> Obj: ...
    def patch_deployment(self, name: str, patch: Obj) -> Obj: ...
    def list_pods(self, selector: str) -> list[Obj]: ...
    def read_service(self, name: str) -> Obj: ...
    def get_virtual_service(self, name: str) -> Obj | None: ...
    def patch_virtual_service(self, name: str, patch: Obj) -> Obj: ...


class KubeCluster:
    """`Cluster` over the kubernetes client; objects are plain dicts in API (camelCase) form."""

    def __init__(self, apps: Any, core: Any, custom: Any, namespace: str) -> None:
        from kubernetes.client import ApiClient

        self.apps, self.core, self.custom, self.namespace = apps, core, custom, namespace
        self._api = ApiClient()

    @classmethod
    def from_environment(cls, namespace: str) -> KubeCluster:
        """In-cluster service account first (the drseg-rollout Role), else the kubeconfig:
        KUBECONFIG as set now (the client reads it once, at import), or ~/.kube/config."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config(os.environ.get("KUBECONFIG"))
            except config.ConfigException as exc:
                raise RolloutError(
                    f"no Kubernetes credentials ({exc}); run in the cluster as the "
                    "drseg-rollout service account, or point KUBECONFIG at a kubeconfig"
                ) from exc
        return cls(client.AppsV1Api(), client.CoreV1Api(), client.CustomObjectsApi(), namespace)

    def _dict(self, obj: Any) -> Obj:
        out: Obj = self._api.sanitize_for_serialization(obj)
        return out

    @staticmethod
    def _or_none(read: Callable[[], Any]) -> Any:
        """read(), or None where the object does not exist (404)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return read()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_deployment(self, name: str) -> Obj | None:
        found = self._or_none(lambda: self.apps.read_namespaced_deployment(name, self.namespace))
        return None if found is None else self._dict(found)

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

    def get_virtual_service(self, name: str) -> Obj | None:
        group, version, plural = ISTIO
        found: Obj | None = self._or_none(
            lambda: self.custom.get_namespaced_custom_object(
                group, version, self.namespace, plural, name
            )
        )
        return found

    def patch_virtual_service(self, name: str, patch: Obj) -> Obj:
        # Custom objects take a JSON merge patch: lists are replaced, so send `http` whole.
        group, version, plural = ISTIO
        out: Obj = self.custom.patch_namespaced_custom_object(
            group, version, self.namespace, plural, name, patch
        )
        return out


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
AgreementFn = Callable[["Cluster", RolloutSettings], float]
"""Dice agreement between stable's and the canary's masks on the fixed probe set."""
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


def _pod_ips(cluster: Cluster, settings: RolloutSettings, canary: bool) -> list[str]:
    """IPs of the running pods of one track, by the Deployment's own selector (stable's
    excludes track=canary, in case it selects by app name alone)."""
    name, extra = (settings.canary, "") if canary else (settings.stable, f"{TRACK_LABEL}!=canary")
    labels = _require(cluster, name)["spec"]["selector"].get("matchLabels", {})
    return [
        pod["status"]["podIP"]
        for pod in cluster.list_pods(_selector(labels, extra))
        if pod.get("status", {}).get("podIP") and pod["status"].get("phase") == "Running"
    ]


def scrape_metrics(
    cluster: Cluster, settings: RolloutSettings, fetch: Callable[[str], str] = _fetch
) -> tuple[TrackMetrics, TrackMetrics]:
    """Real `MetricsFn`: each running pod's :8002/metrics, summed per track."""

    def track(canary: bool) -> TrackMetrics:
        ips = _pod_ips(cluster, settings, canary)
        port = settings.metrics_port
        return _sum([parse_triton_metrics(fetch(f"http://{ip}:{port}/metrics")) for ip in ips])

    return track(canary=False), track(canary=True)


def probe_agreement(
    photos_folder: Path | None, contract_for: ContractFn, model_name: str
) -> AgreementFn:
    """Real `AgreementFn`: the probe photographs through each track's Triton
    (drseg.serving.agreement). A track is reached at rollout.stable_url / canary_url, else at
    its first running pod's IP and rollout.http_port, as from inside the cluster."""
    from drseg.serving.agreement import mask_agreement, probe_photographs

    if photos_folder is None:
        raise RolloutError(
            "rollout.probe_photos is not set: the output-agreement check needs a folder of a "
            "few fundus photographs to send to both tracks; set it in the settings file"
        )
    try:
        photos = probe_photographs(photos_folder)
    except OSError as exc:
        raise RolloutError(f"rollout.probe_photos: {exc}") from exc

    def url(cluster: Cluster, settings: RolloutSettings, canary: bool) -> str:
        given = settings.canary_url if canary else settings.stable_url
        if given:
            return given
        ips = _pod_ips(cluster, settings, canary)
        if not ips:
            track = "canary" if canary else "stable"
            raise RolloutError(
                f"no running {track} pod to send the probe photographs to; check "
                f"`kubectl get pods -l {TRACK_LABEL}={track}` or set rollout.{track}_url"
            )
        return f"{ips[0]}:{settings.http_port}"

    def agreement(cluster: Cluster, settings: RolloutSettings) -> float:
        return mask_agreement(
            photos,
            url(cluster, settings, canary=False),
            url(cluster, settings, canary=True),
            contract_for,
            model_name,
            settings.probe_timeout_s,
        )

    return agreement


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


def canary_replicas(settings: RolloutSettings, step: int) -> int:
    return max(1, math.ceil(settings.steps[step] * settings.total_replicas))


def canary_percent(settings: RolloutSettings, step: int) -> int:
    """The canary's route weight at `step` (with rollout.virtual_service)."""
    return round(settings.steps[step] * 100)


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


def _view(obj: Obj | None) -> str:
    if obj is None:
        return ""
    meta = obj.get("metadata", {})
    keep = {k: meta[k] for k in ("name", "labels", "annotations") if meta.get(k)}
    return yaml.safe_dump({"metadata": keep, "spec": obj.get("spec")}, sort_keys=True, width=1000)


def _diff(before: Obj | None, after: Obj) -> str:
    title = f"{after.get('kind', 'object')}/{after['metadata']['name']}"
    return "".join(
        difflib.unified_diff(
            _view(before).splitlines(keepends=True),
            _view(after).splitlines(keepends=True),
            f"{title} (cluster)",
            f"{title} (planned)",
        )
    )


def _merged(obj: Obj, patch: Obj) -> Obj:
    """What a patch would give, for the dry-run diff (dicts merge, lists are replaced)."""

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return copy.deepcopy(b)

    out: Obj = merge(obj, patch)
    return out


class _Apply:
    """Applies changes, or with dry_run writes their diffs and changes nothing."""

    def __init__(self, cluster: Cluster, dry_run: bool, out: TextIO | None) -> None:
        """`out`: where diffs go; None is the standard output at the time of writing."""
        self.cluster, self.dry_run, self._out = cluster, dry_run, out

    @property
    def out(self) -> TextIO:
        return sys.stdout if self._out is None else self._out

    def create(self, body: Obj) -> None:
        if self.dry_run:
            self.out.write(_diff(None, body))
        else:
            self.cluster.create_deployment(body)

    def patch(self, current: Obj, patch: Obj) -> None:
        self._patch(current, patch, self.cluster.patch_deployment)

    def patch_route(self, current: Obj, patch: Obj) -> None:
        self._patch(current, patch, self.cluster.patch_virtual_service)

    def _patch(self, current: Obj, patch: Obj, send: Callable[[str, Obj], Obj]) -> None:
        if self.dry_run:
            self.out.write(_diff(current, _merged(current, patch)))
        else:
            send(current["metadata"]["name"], patch)


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


def _subsets(rule: Obj) -> set[str | None]:
    return {route.get("destination", {}).get("subset") for route in rule.get("route") or []}


def _weighted_routes(virtual_service: Obj, settings: RolloutSettings, percent: int) -> list[Obj]:
    """The VirtualService's http rules with `percent` on the canary subset and the rest on
    stable, in every rule that routes to exactly those two subsets."""
    http = copy.deepcopy((virtual_service.get("spec") or {}).get("http") or [])
    weights = {settings.stable_subset: 100 - percent, settings.canary_subset: percent}
    split = [rule for rule in http if _subsets(rule) == set(weights)]
    if not split:
        raise RolloutError(
            f"VirtualService {settings.virtual_service!r} has no http rule routing to exactly "
            f"the subsets {sorted(weights)}; add one (manifests/overlays/istio) or set "
            "rollout.stable_subset / canary_subset"
        )
    for rule in split:
        for route in rule["route"]:
            route["weight"] = weights[route["destination"]["subset"]]
    return http


def _route(cluster: Cluster, settings: RolloutSettings, apply: _Apply, percent: int) -> None:
    """With rollout.virtual_service, give the canary `percent` of the traffic; else nothing
    (the replica ratio decides)."""
    if settings.virtual_service is None:
        return
    current = cluster.get_virtual_service(settings.virtual_service)
    if current is None:
        raise RolloutError(
            f"VirtualService {settings.virtual_service!r} not found in namespace "
            f"{settings.namespace!r}; apply manifests/overlays/istio or unset "
            "rollout.virtual_service"
        )
    http = _weighted_routes(current, settings, percent)
    if http != current["spec"]["http"]:
        apply.patch_route(current, {"spec": {"http": http}})


def _wait_ready(
    cluster: Cluster,
    settings: RolloutSettings,
    name: str,
    replicas: int,
    clock: Clock,
    sleep: Sleep,
) -> str | None:
    """None once Deployment `name` runs its latest spec on `replicas` ready pods (as
    `kubectl rollout status` reads it), else why not by the timeout."""
    deadline = clock() + settings.ready_timeout_s
    while True:
        current = _require(cluster, name)
        status = current.get("status") or {}
        ready = status.get("readyReplicas") or 0
        updated = status.get("updatedReplicas") or 0
        generation = current["metadata"].get("generation")
        observed = status.get("observedGeneration")
        fresh = generation is None or (observed is not None and observed >= generation)
        if fresh and ready >= replicas and updated >= replicas:
            return None
        if clock() >= deadline:
            track = current["metadata"].get("labels", {}).get(TRACK_LABEL, name)
            return (
                f"{name} not ready: {ready}/{replicas} replicas ready ({updated} updated) after "
                f"{settings.ready_timeout_s:g}s; see `kubectl describe pods -l track={track}`"
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
    dice = agreement(cluster, settings)
    if dice < settings.min_dice_agreement:
        return f"output agreement Dice {dice:.4f} < {settings.min_dice_agreement}"
    return None


def abort(
    cluster: Cluster,
    settings: RolloutSettings,
    reason: str = "aborted by operator",
    *,
    dry_run: bool = False,
    out: TextIO | None = None,
) -> State | None:
    """Route all traffic to stable, scale the canary to 0 and record why; stable's Deployment
    is not touched. Safe to repeat."""
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
    apply = _Apply(cluster, dry_run, out)
    _route(cluster, settings, apply, 0)
    apply.patch(canary, {**_scale_patch(0), **_state_patch(new, settings)})
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
    out: TextIO | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> State:
    """Create or update the canary for `version` and walk the traffic steps.

    Each step: canary replicas, wait until ready, route weights (Istio), soak, analysis.
    Resumes from the step recorded on the canary. A failed check aborts (canary to 0, reason
    recorded) and raises `RolloutAborted`. With dry_run, prints the next step's changes only.
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
        replicas = canary_replicas(settings, step)
        body = desired_canary(stable, settings, state, replicas)
        _check_service(cluster, settings, body)
        if canary is None:
            apply.create(body)
        else:
            apply.patch(canary, {"metadata": body["metadata"], "spec": body["spec"]})
        if dry_run:
            _route(cluster, settings, apply, canary_percent(settings, step))
            return state
        reason = _wait_ready(cluster, settings, settings.canary, replicas, clock, sleep)
        if reason is None:
            _route(cluster, settings, apply, canary_percent(settings, step))
            sleep(settings.soak_s)
            try:
                reason = _analyse(cluster, settings, metrics, agreement)
            except RolloutError:
                raise
            except Exception as exc:
                # Not a verdict on the canary (a scrape or a probe failed): no abort.
                raise RolloutError(
                    f"step {step}: the analysis could not run ({type(exc).__name__}: {exc}); "
                    f"the canary stays as it is: fix that and run the same command to resume"
                ) from exc
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
    out: TextIO | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> State:
    """Stable takes the canary's version, all traffic goes back to stable once its rolling
    update is ready, the canary goes to 0, then MLflow @champion moves (the old champion
    becomes @previous).

    Until stable's new pods are ready the canary keeps serving, so capacity never dips; if
    they never are, promote stops with the reason and can be re-run. The canary is scaled
    to 0, not deleted: the Role grants no delete. Re-running after a crash repeats only what
    is missing (the patches and registry.promote are idempotent).
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
        if not dry_run:
            # One poll first: the Deployment controller must see the new template before
            # its status says anything about it.
            sleep(settings.poll_s)
            replicas = _require(cluster, settings.stable)["spec"].get("replicas", 1)
            reason = _wait_ready(cluster, settings, settings.stable, replicas, clock, sleep)
            if reason:
                raise RolloutError(
                    f"stable's update to version {state.version} is not ready: {reason}. The "
                    "canary keeps serving; fix the cause and re-run `drseg rollout promote`"
                )
        _route(cluster, settings, apply, 0)
        new = State(state.version, state.step, "promoted")
        apply.patch(canary, {**_scale_patch(0), **_state_patch(new, settings)})
        if dry_run:
            return state
        state = new
    if not dry_run:
        promote_champion(state.version, f"canary rollout passed {len(settings.steps)} steps")
    return state


def status(cluster: Cluster, settings: RolloutSettings) -> Obj:
    """The recorded state, the canary's replica counts and (with Istio) its route weight."""
    canary = cluster.get_deployment(settings.canary)
    state = read_state(canary, settings)
    if canary is None or state is None:
        return {"status": "none"}
    counts = canary.get("status") or {}
    out = {
        **asdict(state),
        "replicas": canary["spec"].get("replicas", 0),
        "readyReplicas": counts.get("readyReplicas") or 0,
    }
    if settings.virtual_service is not None:
        routes = (cluster.get_virtual_service(settings.virtual_service) or {}).get("spec", {})
        out["canaryWeight"] = max(
            (
                route.get("weight", 0)
                for rule in routes.get("http") or []
                for route in rule.get("route") or []
                if route.get("destination", {}).get("subset") == settings.canary_subset
            ),
            default=0,
        )
    return out


# --- `drseg rollout` (cli.py builds the parser) -------------------------------------------


def _registry_contracts(settings: Settings) -> ContractFn:
    """A served version's serving contract, from its model.onnx in the MLflow registry (the
    repository may hold only a TensorRT plan); one download per version and command."""
    from drseg import registry
    from drseg.contract import read_contract
    from drseg.tracking import tracking_uri

    uri = tracking_uri(settings.tracking, settings.home)

    @functools.cache
    def contract(version: str) -> ServingContract:
        with tempfile.TemporaryDirectory(prefix="drseg-contract-") as tmp:
            onnx_path = registry.download_onnx(
                uri, settings.registry.model_name, version, Path(tmp)
            )
            return read_contract(onnx_path)

    return contract


@contextlib.contextmanager
def _exits(verb: str) -> Iterator[None]:
    """Failures as a one-line reason and an exit status: 1 when a check aborted the canary,
    2 when the command could not act (settings, cluster, registry)."""
    from kubernetes.client.exceptions import ApiException

    from drseg.registry import RegistryError

    try:
        yield
    except RolloutAborted as exc:
        print(f"drseg rollout {verb}: aborted: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except (RolloutError, RegistryError) as exc:
        print(f"drseg rollout {verb}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except ApiException as exc:
        print(
            f"drseg rollout {verb}: error: Kubernetes API answered {exc.status} {exc.reason}; "
            "check rollout.namespace and that the drseg-rollout Role is applied (manifests/)",
            file=sys.stderr,
        )
        raise SystemExit(2) from exc


def start_command(args: argparse.Namespace, settings: Settings) -> None:
    with _exits("start"):
        agreement = probe_agreement(
            settings.rollout.probe_photos, _registry_contracts(settings), settings.serve.model_name
        )
        cluster = KubeCluster.from_environment(settings.rollout.namespace)
        state = start(
            cluster,
            settings.rollout,
            args.version,
            scrape_metrics,
            agreement,
            retry=args.retry,
            dry_run=args.dry_run,
        )
    if not args.dry_run:
        print(f"canary of version {state.version}: {state.status}, step {state.step}")


def status_command(args: argparse.Namespace, settings: Settings) -> None:
    with _exits("status"):
        found = status(KubeCluster.from_environment(settings.rollout.namespace), settings.rollout)
    print(json.dumps(found, indent=2))


def promote_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg import registry
    from drseg.tracking import tracking_uri

    uri = tracking_uri(settings.tracking, settings.home)
    name = settings.registry.model_name

    def champion(version: str, reason: str) -> None:
        registry.promote(uri, name, version, reason=reason)

    with _exits("promote"):
        cluster = KubeCluster.from_environment(settings.rollout.namespace)
        state = promote(cluster, settings.rollout, champion, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"version {state.version} is stable and {name}@champion")


def abort_command(args: argparse.Namespace, settings: Settings) -> None:
    with _exits("abort"):
        cluster = KubeCluster.from_environment(settings.rollout.namespace)
        state = abort(cluster, settings.rollout, args.reason, dry_run=args.dry_run)
    if args.dry_run:
        return
    if state is None:
        print("no rollout to abort")
    else:
        print(f"canary of version {state.version} aborted: {state.reason}")
