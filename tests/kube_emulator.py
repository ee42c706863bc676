"""A Kubernetes API emulator (kmock) on 127.0.0.1 for the rollout tests.

No kube-apiserver or Argo Rollouts controller can be installed here (STACK.md). kmock serves
the API paths the kubernetes client calls and keeps the objects in memory: get, list and
patch over HTTP (the status subresource too), with 404s as Status objects, so `KubeRollouts`
runs its real code path (requests, serialisation, errors). What kmock does NOT do:

- filter lists by label selector: every object comes back (the code filters again, and
  tests read the selector off the recorded request);
- merge patches the Kubernetes way: JSON merge patches merge dicts and REPLACE lists, as the
  API server does for custom resources; the code sends whole lists (containers, env);
- fill server fields or run controllers: the Argo Rollouts controller's part (status
  fields, pod-template hashes, ReplicaSets, AnalysisRuns) is written by the tests as
  `argo_status` shows, from the fields Argo documents;
- enforce RBAC: `Emulator.calls` records what was asked, for comparison with the Role.

The emulator runs on its own event loop in a thread; every access to its objects from a test
goes through that loop, so it never races a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml
from kubernetes import client

from drseg.deploy.kube import ARGO_GROUP, ARGO_VERSION, KubeRollouts

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
ROLLOUTS = kmock.resource(ARGO_GROUP, ARGO_VERSION, "rollouts")
ANALYSIS_RUNS = kmock.resource(ARGO_GROUP, ARGO_VERSION, "analysisruns")
REPLICA_SETS = kmock.resource("apps", "v1", "replicasets")

_VERBS = {
    kmock.action.FETCH: "get",
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.CREATE: "create",
    kmock.action.DELETE: "delete",
}
_T = TypeVar("_T")


class Emulator:
    """The test's handle on a running emulator: seeds and reads objects (on its loop) and
    lists the requests it answered; objects live in the namespace "default"."""

    def __init__(
        self, handler: kmock.KubernetesEmulator, url: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.handler, self.url, self.namespace, self._loop = handler, url, "default", loop

    def _on_loop(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def put(self, resource: kmock.resource, body: dict[str, Any]) -> None:
        key = (resource, self.namespace, body["metadata"]["name"])

        def put() -> None:
            self.handler.objects[key] = copy.deepcopy(body)

        self._on_loop(put)

    def get(self, resource: kmock.resource, name: str) -> dict[str, Any] | None:
        def get() -> dict[str, Any] | None:
            key = (resource, self.namespace, name)
            if key not in self.handler.objects or self.handler.objects[key].deleted:
                return None
            return copy.deepcopy(self.handler.objects[key].raw)

        return self._on_loop(get)

    def patch(self, resource: kmock.resource, name: str, changes: dict[str, Any]) -> None:
        self._on_loop(lambda: self.handler.objects[resource, self.namespace, name].patch(changes))

    def names(self, resource: kmock.resource) -> list[str]:
        def live() -> list[str]:
            return sorted(
                name
                for (res, _, name), obj in self.handler.objects.items()
                if res == resource and not obj.deleted
            )

        return self._on_loop(live)

    def rollout(self, name: str = "triton") -> dict[str, Any]:
        found = self.get(ROLLOUTS, name)
        assert found is not None, f"no Rollout {name}"
        return found

    def requests(self) -> list[kmock.Request]:
        return self._on_loop(lambda: list(self.handler))

    def calls(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource, verb) of every API request so far, as RBAC names them."""
        out = set()
        for request in self.requests():
            resource = request.resource
            if resource is None:  # discovery paths, not resources
                continue
            if request.action == kmock.action.UPDATE:
                verb = "patch" if request.method == kmock.method.PATCH else "update"
            else:
                verb = _VERBS[request.action]
            plural = resource.plural + (f"/{request.subresource}" if request.subresource else "")
            out.add((resource.group, plural, verb))
        return out

    def writes(self) -> int:
        return sum(
            r.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
            for r in self.requests()
        )

    def kube(self) -> KubeRollouts:
        """The rollout's own cluster class, pointed here."""
        api = client.ApiClient(client.Configuration(host=self.url))
        return KubeRollouts(client.CustomObjectsApi(api), client.AppsV1Api(api), self.namespace)

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this emulator, for `KubeCluster.from_environment` (KUBECONFIG)."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "kmock", "user": {"token": "test"}}],
                    "contexts": [
                        {"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return path


@contextlib.contextmanager
def emulator() -> Iterator[Emulator]:
    """kmock's Kubernetes emulator serving on 127.0.0.1, for the duration of the block."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started: queue.Queue[Emulator | BaseException] = queue.Queue()

    async def serve() -> None:
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            # Listable before any object exists.
            handler.resources[f"{ARGO_GROUP}/{ARGO_VERSION}/analysisruns"] = {}
            handler.resources["apps/v1/replicasets"] = {}
            started.put(Emulator(handler, str(server.url).rstrip("/"), loop))
            await stop.wait()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            started.put(exc)

    thread = threading.Thread(target=run, name="kmock", daemon=True)
    thread.start()
    first = started.get(timeout=30)
    if isinstance(first, BaseException):
        raise RuntimeError("kmock did not start") from first
    try:
        yield first
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def manifest(path: Path, kind: str) -> dict[str, Any]:
    """The one document of `kind` in a manifest file."""
    (doc,) = (d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == kind)
    return dict(doc)


def argo_status(rollout: dict[str, Any], stable: str, current: str, step: int) -> dict[str, Any]:
    """The status Argo Rollouts writes: the stable and newest pod-template hashes, the step
    reached (Argo's phase names)."""
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    paused = step < len(steps) and "pause" in steps[step]
    done = stable == current
    return {
        "stableRS": stable,
        "currentPodHash": current,
        "currentStepIndex": step,
        "phase": "Healthy" if done else ("Paused" if paused else "Progressing"),
        **({"pauseConditions": [{"reason": "CanaryPauseStep"}]} if paused else {}),
    }


@contextlib.contextmanager
def triton_cluster() -> Iterator[Emulator]:
    """The emulator holding what `kubectl apply -k manifests/base` deploys before any
    rollout, as Argo leaves it: the Rollout at its first revision, stable."""
    with emulator() as cluster:
        rollout = manifest(MANIFESTS / "base" / "triton-rollout.yaml", "Rollout")
        rollout["metadata"]["namespace"] = cluster.namespace
        steps = len(rollout["spec"]["strategy"]["canary"]["steps"])
        rollout["status"] = argo_status(rollout, "hash-0", "hash-0", steps)
        cluster.put(ROLLOUTS, rollout)
        yield cluster
