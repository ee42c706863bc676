"""`drseg rollout`: a thin layer over the Argo Rollouts `Rollout` (manifests/base).

start sets the version on the Rollout's pod template (the repository URI and the version
label), which is all Argo needs to start a canary; status reads the Rollout and its
AnalysisRuns; promote and abort patch the same fields `kubectl argo rollouts promote` and
`abort` do. The traffic steps, the analysis and the scaling are Argo's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from drseg.config import RolloutSettings
from drseg.deploy.kube import Obj, RolloutCluster, RolloutError

VERSION_LABEL = "drseg.io/model-version"
REPOSITORY_ENV = "MODEL_REPOSITORY_S3_URI"
HASH_LABEL = "rollouts-pod-template-hash"


def template_version(rollout: Obj) -> str | None:
    """The version the Rollout's newest pod template serves."""
    labels = rollout["spec"]["template"].get("metadata", {}).get("labels") or {}
    version: str | None = labels.get(VERSION_LABEL)
    return version


def _status(rollout: Obj) -> dict[str, Any]:
    status: dict[str, Any] = rollout.get("status") or {}
    return status


def fully_promoted(rollout: Obj) -> bool:
    """Argo has made the newest template stable: every step done, not aborted."""
    status = _status(rollout)
    current = status.get("currentPodHash")
    return bool(current) and status.get("stableRS") == current and not status.get("abort")


def _steps(rollout: Obj) -> list[Obj]:
    steps: list[Obj] = rollout["spec"]["strategy"].get("canary", {}).get("steps") or []
    return steps


def set_version(
    cluster: RolloutCluster,
    settings: RolloutSettings,
    version: int,
    repository_uri: str,
    *,
    retry: bool = False,
) -> Obj:
    """Point the Rollout's template at `version` (Argo starts the canary). Idempotent; refuses
    while another version's canary is under way. `retry` restarts an aborted one, as
    `kubectl argo rollouts retry rollout` does."""
    rollout = cluster.get_rollout(settings.name)
    current, status = template_version(rollout), _status(rollout)
    wanted = str(version)
    if current == wanted:
        if status.get("abort"):
            if not retry:
                raise RolloutError(
                    f"the canary of version {wanted} was aborted "
                    f"({status.get('message') or 'no message'}); fix the cause and pass --retry"
                )
            return cluster.patch_rollout_status(settings.name, {"status": {"abort": False}})
        return rollout
    if not fully_promoted(rollout) and not status.get("abort") and status.get("stableRS"):
        raise RolloutError(
            f"a canary of version {current} is under way; `drseg rollout promote` or `abort` "
            "it first"
        )
    template = copy.deepcopy(rollout["spec"]["template"])
    template.setdefault("metadata", {}).setdefault("labels", {})[VERSION_LABEL] = wanted
    named = [c for c in template["spec"]["containers"] if c["name"] == settings.container]
    if len(named) != 1:
        raise RolloutError(
            f"Rollout {settings.name!r} has no container {settings.container!r} in its pod "
            "template; set rollout.container"
        )
    container = named[0]
    env = [e for e in container.get("env") or [] if e["name"] != REPOSITORY_ENV]
    container["env"] = [*env, {"name": REPOSITORY_ENV, "value": repository_uri}]
    patch = {"metadata": {"labels": {VERSION_LABEL: wanted}}, "spec": {"template": template}}
    return cluster.patch_rollout(settings.name, patch)


@dataclass(frozen=True)
class AnalysisRun:
    name: str
    phase: str
    message: str


@dataclass(frozen=True)
class RolloutStatus:
    phase: str
    message: str
    version: str | None
    """What the newest template serves (the canary's while one is under way)."""
    stable_version: str | None
    step: int
    steps: int
    canary_weight: int
    aborted: bool
    promoted: bool
    analysis: list[AnalysisRun] = field(default_factory=list)


def _stable_version(cluster: RolloutCluster, rollout: Obj) -> str | None:
    status = _status(rollout)
    stable = status.get("stableRS")
    if not stable:
        return None
    if stable == status.get("currentPodHash"):
        return template_version(rollout)
    for replica_set in cluster.list_replica_sets(f"{HASH_LABEL}={stable}"):
        labels = replica_set["metadata"].get("labels") or {}
        if labels.get(HASH_LABEL) == stable:
            return template_version(replica_set)
    return None


def _analysis_runs(cluster: RolloutCluster, rollout: Obj) -> list[AnalysisRun]:
    """The newest template's AnalysisRuns (Argo labels them with its pod-template hash)."""
    current = _status(rollout).get("currentPodHash")
    if not current:
        return []
    name = rollout["metadata"]["name"]
    runs = []
    for run in cluster.list_analysis_runs(f"{HASH_LABEL}={current}"):
        meta = run["metadata"]
        owners = {o.get("name") for o in meta.get("ownerReferences") or []}
        if (meta.get("labels") or {}).get(HASH_LABEL) != current or name not in owners:
            continue
        run_status = run.get("status") or {}
        runs.append(
            AnalysisRun(meta["name"], run_status.get("phase", ""), run_status.get("message", ""))
        )
    return sorted(runs, key=lambda r: r.name)


def _canary_weight(rollout: Obj) -> int:
    """Argo's own record where a traffic router sets it, else the weight of the last
    setWeight step reached (what the basic canary scales the ReplicaSets to)."""
    status = _status(rollout)
    if fully_promoted(rollout) or status.get("abort"):
        return 0
    routed = (status.get("canary") or {}).get("weights", {}).get("canary", {}).get("weight")
    if routed is not None:
        return int(routed)
    reached = _steps(rollout)[: int(status.get("currentStepIndex") or 0) + 1]
    weights = [s["setWeight"] for s in reached if "setWeight" in s]
    return int(weights[-1]) if weights else 0


def read_status(cluster: RolloutCluster, settings: RolloutSettings) -> RolloutStatus:
    rollout = cluster.get_rollout(settings.name)
    status = _status(rollout)
    return RolloutStatus(
        phase=str(status.get("phase", "")),
        message=str(status.get("message", "")),
        version=template_version(rollout),
        stable_version=_stable_version(cluster, rollout),
        step=int(status.get("currentStepIndex") or 0),
        steps=len(_steps(rollout)),
        canary_weight=_canary_weight(rollout),
        aborted=bool(status.get("abort")),
        promoted=fully_promoted(rollout),
        analysis=_analysis_runs(cluster, rollout),
    )


def _inconclusive(rollout: Obj) -> bool:
    canary = _status(rollout).get("canary") or {}
    return (canary.get("currentStepAnalysisRunStatus") or {}).get("status") == "Inconclusive"


def promote(cluster: RolloutCluster, settings: RolloutSettings, *, full: bool = False) -> Obj:
    """`kubectl argo rollouts promote [--full]`: unpause, clear the pause conditions or skip
    the current step; with `full`, skip every remaining step and analysis."""
    name = settings.name
    rollout = cluster.get_rollout(name)
    status = _status(rollout)
    if status.get("abort"):
        raise RolloutError(
            f"the canary of version {template_version(rollout)} was aborted; "
            "`drseg rollout start --retry` restarts it"
        )
    if full:
        if status.get("currentPodHash") != status.get("stableRS"):
            rollout = cluster.patch_rollout_status(name, {"status": {"promoteFull": True}})
        return rollout
    if rollout["spec"].get("paused"):
        rollout = cluster.patch_rollout(name, {"spec": {"paused": False}})
    steps = len(_steps(rollout))
    index = int(status.get("currentStepIndex") or 0)
    patch: Obj | None = None
    if _inconclusive(rollout) and status.get("pauseConditions") and status.get("controllerPause"):
        patch = {
            "pauseConditions": None,
            "controllerPause": False,
            "currentStepIndex": min(index + 1, steps),
        }
    elif status.get("pauseConditions"):
        patch = {"pauseConditions": None}
    elif steps:
        patch = {"pauseConditions": None, "currentStepIndex": min(index + 1, steps)}
    if patch is not None:
        rollout = cluster.patch_rollout_status(name, {"status": patch})
    return rollout


def pauses_ahead(rollout: Obj) -> bool:
    """A pause step lies ahead (the current one counts unless its pause was just released):
    the canary will wait there for an operator again, so it will not become stable by
    itself."""
    status = _status(rollout)
    rest = _steps(rollout)[int(status.get("currentStepIndex") or 0) :]
    if rest and "pause" in rest[0] and not status.get("pauseConditions"):
        rest = rest[1:]
    return any("pause" in step for step in rest)


def abort(cluster: RolloutCluster, settings: RolloutSettings) -> Obj:
    """`kubectl argo rollouts abort`: Argo scales the canary down and routes everything to
    stable; the analysis is stopped."""
    return cluster.patch_rollout_status(settings.name, {"status": {"abort": True}})
