"""`drseg rollout` as a thin layer over the Argo Rollouts `Rollout`, through `KubeRollouts`
(the kubernetes client) against kmock's API emulator (tests/kube_emulator.py says what it
does not emulate). The Argo controller's part, the status fields it writes as a canary goes
through its steps, is written by the tests with `argo_status`. @champion moves in a real
MLflow registry (SQLite). Every verb's API calls are then compared with the Role.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from drseg import registry
from drseg.cli import main
from drseg.config import RolloutSettings, TrackingSettings
from drseg.deploy import argo
from drseg.deploy.kube import RolloutError
from drseg.deploy.publish import MARKER
from drseg.tracking import stage_run
from tests.kube_emulator import (
    ANALYSIS_RUNS,
    MANIFESTS,
    REPLICA_SETS,
    ROLLOUTS,
    Emulator,
    argo_status,
    manifest,
    triton_cluster,
)
from tests.test_manifests import _kubectl
from tests.test_registry import _aliases, _register, write_model_files

SETTINGS = RolloutSettings()
URI = "s3://drseg-models/triton/7"
STEPS = 5
"""setWeight 25, analysis, setWeight 50, analysis, pause (manifests/base)."""


@pytest.fixture
def kube() -> Iterator[Emulator]:
    with triton_cluster() as cluster:
        yield cluster


def _container(rollout: dict[str, Any]) -> dict[str, Any]:
    (container,) = rollout["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _argo(kube: Emulator, stable: str, current: str, step: int, **extra: Any) -> None:
    """Play the Argo controller: write the status it would at `step`."""
    status = {**argo_status(kube.rollout(), stable, current, step), **extra}
    kube.patch(ROLLOUTS, "triton", {"status": status})


def _stable_replica_set(kube: Emulator, pod_hash: str, version: str) -> None:
    """The ReplicaSet Argo keeps for the stable revision (what serves `version`)."""
    labels = {argo.HASH_LABEL: pod_hash}
    kube.put(
        REPLICA_SETS,
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": f"triton-{pod_hash}", "labels": labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": {argo.VERSION_LABEL: version, **labels}},
                    "spec": {"containers": [{"name": "triton", "image": "triton"}]},
                },
            },
        },
    )


def test_start_sets_the_version_on_the_template_only(kube: Emulator) -> None:
    before = kube.rollout()
    argo.set_version(kube.kube(), SETTINGS, 7, URI)
    after = kube.rollout()
    assert after["metadata"]["labels"][argo.VERSION_LABEL] == "7"
    assert after["spec"]["template"]["metadata"]["labels"][argo.VERSION_LABEL] == "7"
    env = _container(after)["env"]
    assert env == [{"name": argo.REPOSITORY_ENV, "value": URI}]
    # Everything else of the container and the strategy is as the manifests declare it.
    assert {k: v for k, v in _container(after).items() if k != "env"} == {
        k: v for k, v in _container(before).items() if k != "env"
    }
    assert after["spec"]["strategy"] == before["spec"]["strategy"]
    writes = kube.writes()
    argo.set_version(kube.kube(), SETTINGS, 7, URI)  # again: nothing to do
    assert kube.writes() == writes


def test_start_refuses_while_another_canary_is_under_way(kube: Emulator) -> None:
    argo.set_version(kube.kube(), SETTINGS, 7, URI)
    _argo(kube, "hash-0", "hash-7", 1)
    with pytest.raises(RolloutError, match="a canary of version 7 is under way"):
        argo.set_version(kube.kube(), SETTINGS, 8, "s3://drseg-models/triton/8")


def test_status_reads_the_rollout_its_analysis_and_stable(kube: Emulator) -> None:
    _stable_replica_set(kube, "hash-0", "6")
    for name, pod_hash, owner, phase in (
        ("triton-hash-7-2", "hash-7", "triton", "Running"),
        ("triton-hash-7-1", "hash-7", "triton", "Successful"),
        ("triton-hash-5-1", "hash-5", "triton", "Failed"),
        ("other-hash-7-1", "hash-7", "other", "Failed"),
    ):
        kube.put(
            ANALYSIS_RUNS,
            {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "AnalysisRun",
                "metadata": {
                    "name": name,
                    "labels": {argo.HASH_LABEL: pod_hash},
                    "ownerReferences": [{"kind": "Rollout", "name": owner}],
                },
                "status": {"phase": phase, "message": ""},
            },
        )
    argo.set_version(kube.kube(), SETTINGS, 7, URI)
    _argo(kube, "hash-0", "hash-7", 3)  # the analysis after setWeight 50
    status = argo.read_status(kube.kube(), SETTINGS)
    assert (status.version, status.stable_version) == ("7", "6")
    assert (status.step, status.steps, status.canary_weight) == (3, STEPS, 50)
    assert (status.phase, status.aborted, status.promoted) == ("Progressing", False, False)
    assert [(r.name, r.phase) for r in status.analysis] == [
        ("triton-hash-7-1", "Successful"),
        ("triton-hash-7-2", "Running"),
    ]
    # A traffic router's own record wins over the step's weight.
    _argo(kube, "hash-0", "hash-7", 3, canary={"weights": {"canary": {"weight": 40}}})
    assert argo.read_status(kube.kube(), SETTINGS).canary_weight == 40


def test_promote_and_abort_patch_what_kubectl_argo_rollouts_does(kube: Emulator) -> None:
    argo.set_version(kube.kube(), SETTINGS, 7, URI)
    _argo(kube, "hash-0", "hash-7", 4)  # at the final pause
    argo.promote(kube.kube(), SETTINGS)
    status = kube.rollout()["status"]
    assert not status.get("pauseConditions")
    assert status["currentStepIndex"] == 4  # pause conditions cleared, step not skipped
    assert not argo.pauses_ahead(kube.rollout()), "past the last pause Argo completes alone"

    _argo(kube, "hash-0", "hash-7", 1)  # in an analysis step, not paused: skip the step
    kube.patch(ROLLOUTS, "triton", {"status": {"pauseConditions": None}})
    argo.promote(kube.kube(), SETTINGS)
    assert kube.rollout()["status"]["currentStepIndex"] == 2
    assert argo.pauses_ahead(kube.rollout())

    kube.patch(ROLLOUTS, "triton", {"spec": {"paused": True}})
    argo.promote(kube.kube(), SETTINGS)
    assert kube.rollout()["spec"]["paused"] is False

    argo.promote(kube.kube(), SETTINGS, full=True)
    assert kube.rollout()["status"]["promoteFull"] is True

    argo.abort(kube.kube(), SETTINGS)
    assert kube.rollout()["status"]["abort"] is True
    with pytest.raises(RolloutError, match="was aborted"):
        argo.promote(kube.kube(), SETTINGS)
    with pytest.raises(RolloutError, match="pass --retry"):
        argo.set_version(kube.kube(), SETTINGS, 7, URI)
    argo.set_version(kube.kube(), SETTINGS, 7, URI, retry=True)
    assert kube.rollout()["status"]["abort"] is False


@dataclass(frozen=True)
class Registry:
    home: Path
    uri: str
    run_id: str
    files: tuple[Path, Path]


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """One SQLite registry for the module (creating one takes seconds); each test registers
    a model of its own."""
    home = tmp_path_factory.mktemp("registry")
    with stage_run(
        TrackingSettings(experiment="rollout"), home, "register", pipeline_run_id="p-1"
    ) as run:
        run_id = run.run_id
    (home / "model").mkdir()
    uri = f"sqlite:///{home}/mlflow.db"
    return Registry(home, uri, run_id, write_model_files(home / "model"))


@pytest.fixture
def cli_env(
    kube: Emulator,
    registry_db: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[str, str]]:
    """KUBECONFIG on the emulator, a model with versions 1 (@champion) and 2, and version 2
    published in a local folder standing in for the object store."""
    name = f"seg-{request.node.name}"
    for _ in range(2):
        _register(registry_db.uri, name, registry_db.run_id, registry_db.files)
    registry.promote(registry_db.uri, name, 1)
    store = tmp_path / "store"
    (store / "2").mkdir(parents=True)
    (store / "2" / MARKER).write_text('{"files": {}}')
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("DRSEG_HOME", str(registry_db.home))
    monkeypatch.setenv("DRSEG_REGISTRY__MODEL_NAME", name)
    monkeypatch.setenv("DRSEG_ROLLOUT__REPOSITORY_URI", f"{store}/{{version}}")
    monkeypatch.setenv("DRSEG_ROLLOUT__PROMOTE_TIMEOUT_S", "0")
    yield registry_db.uri, name


def _status(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    main(["rollout", "status"])
    found: dict[str, Any] = json.loads(capsys.readouterr().out)
    return found


def test_cli_champion_moves_when_and_only_when_fully_promoted(
    kube: Emulator, cli_env: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    uri, name = cli_env
    with pytest.raises(SystemExit) as exited:
        main(["rollout", "start", "--version", "3"])
    assert exited.value.code == 2
    assert "version 3 is not published" in capsys.readouterr().err

    main(["rollout", "start", "--version", "2"])
    capsys.readouterr()
    _argo(kube, "hash-1", "hash-2", 4)  # every analysis passed; paused for an operator
    _stable_replica_set(kube, "hash-1", "1")
    assert _status(capsys)["drift"] is None
    main(["rollout", "promote"])
    assert "@champion stays at 1" in capsys.readouterr().out
    assert _aliases(uri, name)["champion"] == "1"

    _argo(kube, "hash-2", "hash-2", STEPS)  # Argo finished: 2 is stable
    found = _status(capsys)
    assert (found["stable_version"], found["champion"], found["promoted"]) == ("2", "1", True)
    assert "@champion is 1 but stable serves version 2" in found["drift"]
    main(["rollout", "promote"])
    assert "version 2 is stable and @champion (2)" in capsys.readouterr().out
    assert _aliases(uri, name) == {"champion": "2", "previous": "1"}
    assert _status(capsys)["drift"] is None


def test_cli_abort_never_moves_champion(
    kube: Emulator, cli_env: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    uri, name = cli_env
    main(["rollout", "start", "--version", "2"])
    _argo(kube, "hash-1", "hash-2", 1)
    main(["rollout", "abort"])
    assert kube.rollout()["status"]["abort"] is True
    with pytest.raises(SystemExit) as exited:
        main(["rollout", "promote"])
    assert exited.value.code == 2
    assert "was aborted" in capsys.readouterr().err
    assert _aliases(uri, name)["champion"] == "1"


def _role_calls() -> set[tuple[str, str, str]]:
    role = yaml.safe_load((MANIFESTS / "base" / "rollout-role.yaml").read_text())
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_role_grants_exactly_the_calls_the_verbs_make(
    kube: Emulator, cli_env: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    main(["rollout", "start", "--version", "2"])
    _argo(kube, "hash-1", "hash-2", 4)
    main(["rollout", "status"])
    main(["rollout", "promote"])
    main(["rollout", "abort"])
    main(["rollout", "start", "--version", "2", "--retry"])
    main(["rollout", "promote", "--full"])
    assert kube.calls() == _role_calls()


def test_start_names_a_missing_container(kube: Emulator) -> None:
    wrong = SETTINGS.model_copy(update={"container": "server"})
    with pytest.raises(RolloutError, match=r"no container 'server'.*set rollout\.container"):
        argo.set_version(kube.kube(), wrong, 7, URI)


def test_the_readme_kubectl_patch_makes_the_same_change_as_start(
    kube: Emulator, tmp_path: Path
) -> None:
    """The kubectl-only path of the README sets exactly what `drseg rollout start` sets."""
    readme = (MANIFESTS.parent / "README.md").read_text()
    found = re.search(r"kubectl patch rollout triton --type json -p '(.*?)'", readme, re.S)
    assert found, "README: no kubectl patch of the Rollout"
    source = tmp_path / "rollout.yaml"
    source.write_text(
        yaml.safe_dump(manifest(MANIFESTS / "base" / "triton-rollout.yaml", "Rollout"))
    )
    command = [_kubectl(), "patch", "--local", "-f", str(source), "--type", "json"]
    patched = subprocess.run(
        [*command, "-p", found.group(1), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    by_kubectl = json.loads(patched.stdout)
    argo.set_version(kube.kube(), SETTINGS, 7, URI)
    by_drseg = kube.rollout()
    assert by_kubectl["spec"]["template"] == by_drseg["spec"]["template"]
    assert by_kubectl["metadata"]["labels"] == by_drseg["metadata"]["labels"]
