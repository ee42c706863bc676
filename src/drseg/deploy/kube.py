"""The Kubernetes calls of `drseg rollout`, and only those (manifests/base/rollout-role.yaml
grants exactly these; tests/deploy/test_argo.py derives them by running every verb).

Objects are plain dicts in API (camelCase) form. Argo Rollouts objects go through the
custom-objects API as JSON merge patches (lists replaced whole); the status subresource is
patched separately, as `kubectl argo rollouts` does since Rollouts use status subresources.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from drseg.errors import UserError

ARGO_GROUP, ARGO_VERSION = "argoproj.io", "v1alpha1"

Obj = dict[str, Any]


class RolloutError(UserError, RuntimeError):
    """A rollout command cannot go on; the message says what to do."""


class RolloutCluster(Protocol):
    def get_rollout(self, name: str) -> Obj: ...
    def patch_rollout(self, name: str, patch: Obj) -> Obj: ...
    def patch_rollout_status(self, name: str, patch: Obj) -> Obj: ...
    def list_analysis_runs(self, selector: str) -> list[Obj]: ...
    def list_replica_sets(self, selector: str) -> list[Obj]: ...


class KubeRollouts:
    """`RolloutCluster` over the kubernetes client, in one namespace."""

    def __init__(self, custom: Any, apps: Any, namespace: str) -> None:
        from kubernetes.client import ApiClient

        self.custom, self.apps, self.namespace = custom, apps, namespace
        self._api = ApiClient()

    @classmethod
    def from_environment(cls, namespace: str) -> KubeRollouts:
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
        return cls(client.CustomObjectsApi(), client.AppsV1Api(), namespace)

    def _rollouts(self) -> tuple[str, str, str, str]:
        return ARGO_GROUP, ARGO_VERSION, self.namespace, "rollouts"

    def get_rollout(self, name: str) -> Obj:
        from kubernetes.client.exceptions import ApiException

        try:
            found: Obj = self.custom.get_namespaced_custom_object(*self._rollouts(), name)
        except ApiException as exc:
            if exc.status == 404:
                raise RolloutError(
                    f"Rollout {name!r} not found in namespace {self.namespace!r}: install Argo "
                    "Rollouts and `kubectl apply -k manifests/base`, or set rollout.namespace "
                    "/ rollout.name"
                ) from exc
            raise
        return found

    def patch_rollout(self, name: str, patch: Obj) -> Obj:
        out: Obj = self.custom.patch_namespaced_custom_object(*self._rollouts(), name, patch)
        return out

    def patch_rollout_status(self, name: str, patch: Obj) -> Obj:
        out: Obj = self.custom.patch_namespaced_custom_object_status(*self._rollouts(), name, patch)
        return out

    def list_analysis_runs(self, selector: str) -> list[Obj]:
        found = self.custom.list_namespaced_custom_object(
            ARGO_GROUP, ARGO_VERSION, self.namespace, "analysisruns", label_selector=selector
        )
        items: list[Obj] = found.get("items", [])
        return items

    def list_replica_sets(self, selector: str) -> list[Obj]:
        found = self.apps.list_namespaced_replica_set(self.namespace, label_selector=selector)
        return [self._api.sanitize_for_serialization(rs) for rs in found.items]
