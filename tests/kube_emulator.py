"""A Kubernetes API emulator (kmock) on 127.0.0.1 for the rollout tests, and a fake controller.

No kube-apiserver can be installed here (STACK.md). kmock serves the API paths the kubernetes
client calls and keeps the objects in memory: get, list, create and patch over HTTP, with
404s as Status objects, so `KubeCluster` runs its real code path (requests, serialisation,
errors). What kmock does NOT do:

- filter lists by label selector: every pod comes back (tests read the selector off the
  recorded request instead);
- merge patches the Kubernetes way: strategic-merge and JSON merge patches both merge dicts
  and REPLACE lists. The rollout sends whole lists (containers, env, http routes), for which
  the result is the same;
- fill server fields (generation, resourceVersion, uid, status) or run controllers:
  `Controller` plays the generation counter and the Deployment controller;
- enforce RBAC: `Emulator.calls` records what was asked, for comparison with the Roles.

The emulator runs on its own event loop in a thread; every access to its objects from a test
goes through that loop, so it never races a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml
from kubernetes import client

from drseg.rollout import ISTIO, KubeCluster

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
ISTIO_OVERLAY = MANIFESTS / "overlays" / "istio"
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
PODS = kmock.resource("", "v1", "pods")
SERVICES = kmock.resource("", "v1", "services")
VIRTUAL_SERVICES = kmock.resource(*ISTIO)

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

    def deployment(self, name: str) -> dict[str, Any]:
        found = self.get(DEPLOYMENTS, name)
        assert found is not None, f"no Deployment {name}"
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

    def kube(self) -> KubeCluster:
        """The rollout's own cluster class, pointed here."""
        api = client.ApiClient(client.Configuration(host=self.url))
        return KubeCluster(
            client.AppsV1Api(api),
            client.CoreV1Api(api),
            client.CustomObjectsApi(api),
            self.namespace,
        )

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
            handler.resources["v1/pods"] = {}  # listable before any pod exists
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


def stable_deployment() -> dict[str, Any]:
    """The base Deployment as the stable overlay labels it."""
    stable = manifest(MANIFESTS / "base" / "triton-deployment.yaml", "Deployment")
    stable["metadata"]["labels"]["track"] = "stable"
    stable["spec"]["selector"]["matchLabels"]["track"] = "stable"
    stable["spec"]["template"]["metadata"]["labels"]["track"] = "stable"
    return stable


@contextlib.contextmanager
def triton_cluster() -> Iterator[Emulator]:
    """The emulator holding what the manifests deploy before a rollout: the stable
    Deployment, the shared Service and the Istio overlay's VirtualService."""
    with emulator() as cluster:
        cluster.put(DEPLOYMENTS, stable_deployment())
        cluster.put(SERVICES, manifest(MANIFESTS / "base" / "triton-service.yaml", "Service"))
        cluster.put(
            VIRTUAL_SERVICES, manifest(ISTIO_OVERLAY / "triton-routes.yaml", "VirtualService")
        )
        yield cluster


class Clock:
    """Fake time for rollout.start: sleep() advances it and lets the controller act, so no
    test waits for real."""

    def __init__(self, controller: Controller) -> None:
        self.t, self.controller = 0.0, controller

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.controller.reconcile()


class Controller:
    """Plays what kmock does not: on each reconcile() a Deployment whose spec changed gets
    generation + 1 (the API server's job), then observedGeneration = generation and
    readyReplicas = updatedReplicas = spec.replicas, or 0 for the names in `failing` (the
    Deployment controller's job, with pods that never pass their readiness probe)."""

    def __init__(self, cluster: Emulator, failing: tuple[str, ...] = ()) -> None:
        self.cluster, self.failing = cluster, failing
        self._specs: dict[str, str] = {}

    def reconcile(self) -> None:
        for name in self.cluster.names(DEPLOYMENTS):
            deployment = self.cluster.deployment(name)
            spec = json.dumps(deployment["spec"], sort_keys=True)
            generation = deployment["metadata"].get("generation", 0)
            if self._specs.get(name) != spec:
                generation += 1
                self._specs[name] = spec
            ready = 0 if name in self.failing else deployment["spec"].get("replicas", 1)
            self.cluster.patch(
                DEPLOYMENTS,
                name,
                {
                    "metadata": {"generation": generation},
                    "status": {
                        "observedGeneration": generation,
                        "readyReplicas": ready,
                        "updatedReplicas": ready,
                    },
                },
            )
