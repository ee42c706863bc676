"""The canary rollout's checks against real servers on 127.0.0.1.

Output agreement: two real Triton servers (pytriton's bundled tritonserver) serve a tiny model
as versions 3 and 4, with weights from different seeds; the probe photographs go through
`drseg.serving.agreement` exactly as the rollout sends them, and the served Dice is checked
against Dice computed from direct ONNX Runtime outputs (pytriton under the wrong numpy serves
all-zero inputs without an error, STACK.md). Promotion: `drseg rollout promote` moves the
aliases on a real MLflow server. The cluster in both is kmock's API emulator with the fake
controller of tests/kube_emulator.py (what it does not emulate is said there).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from drseg import registry, rollout
from drseg.cli import main
from drseg.config import ExportSettings, RolloutSettings, ServeSettings, TrackingSettings
from drseg.contract import ServingContract, read_contract
from drseg.data.synthetic import write_synthetic_dataset
from drseg.export.onnx_export import export_onnx
from drseg.rollout import RolloutAborted, TrackMetrics
from drseg.serving.agreement import mask_agreement, probe_photographs
from drseg.serving.client import Masks, prepare_photograph, served_masks
from drseg.serving.repository import write_repository
from drseg.serving.server import RunningServer, running_server
from drseg.tracking import stage_run
from tests.export import CLAHE, INGEST, THRESHOLDS, write_tiny_model
from tests.integration.mlflow_server import MlflowServer
from tests.kube_emulator import Clock, Controller, Emulator, triton_cluster
from tests.ports import free_ports
from tests.test_registry import _aliases, _register, relu_runs, write_model_files

pytestmark = pytest.mark.integration

SEEDS = {"3": 0, "4": 1}
"""Served version -> seed of its random weights."""


@dataclass(frozen=True)
class Served:
    servers: dict[str, RunningServer]
    """Served version -> its server."""
    onnx: dict[str, Path]
    photos: Path

    def contract(self, version: str) -> ServingContract:
        return read_contract(self.onnx[version])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server per version; two probe photographs, 256 px wide (192 px working width)."""
    work = tmp_path_factory.mktemp("tracks")
    write_synthetic_dataset(work / "probes", n=2, seed=5, width=256)
    onnx = {}
    for version, seed in SEEDS.items():
        folder = work / version
        write_tiny_model(folder / "model", seed=seed)
        exported = export_onnx(
            folder / "model",
            THRESHOLDS,
            folder / "model.onnx",
            ExportSettings(),
            INGEST,
            CLAHE,
            model_version=int(version),
        ).path
        repository = write_repository(folder / "repo", exported, int(version), ServeSettings())
        onnx[version] = repository / "model.onnx"
    with contextlib.ExitStack() as stack:
        servers = {}
        for version in SEEDS:
            http, grpc, metrics = free_ports(3)
            settings = ServeSettings(http_port=http, grpc_port=grpc, metrics_port=metrics)
            servers[version] = stack.enter_context(
                running_server(work / version / "repo", settings, log_file=work / version / "log")
            )
        yield Served(servers, onnx, work / "probes" / "images")


def _direct_masks(onnx_path: Path, photo: Path) -> Masks:
    contract = read_contract(onnx_path)
    prepared = prepare_photograph(photo, contract)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output = session.run([contract.output_name], {contract.input_name: prepared.model_input[None]})
    return served_masks(np.asarray(output[0], np.float32), prepared, contract)


def test_agreement_of_two_real_tritons(served: Served) -> None:
    photos = probe_photographs(served.photos)
    assert len(photos) == 2
    stable, other = served.servers["3"].http_url, served.servers["4"].http_url
    assert mask_agreement(photos, stable, stable, served.contract) == 1.0

    dice = mask_agreement(photos, stable, other, served.contract)
    # The same number from ONNX Runtime directly: lowest per-class Dice, pooled over photos.
    a = np.stack([_direct_masks(served.onnx["3"], p) for p in photos])
    b = np.stack([_direct_masks(served.onnx["4"], p) for p in photos])
    assert a.any() and b.any(), "empty masks would make the comparison vacuous"
    per_class = [
        2 * (a[:, c] & b[:, c]).sum() / (a[:, c].sum() + b[:, c].sum()) for c in range(a.shape[1])
    ]
    assert dice == pytest.approx(min(per_class))
    assert dice < 0.95


def _settings(stable_url: str, canary_url: str, photos: Path) -> RolloutSettings:
    return RolloutSettings(
        ready_timeout_s=3,
        poll_s=1,
        soak_s=0,
        stable_url=stable_url,
        canary_url=canary_url,
        probe_photos=photos,
    )


def _start(kube: Emulator, settings: RolloutSettings, version: str, served: Served) -> None:
    clock = Clock(Controller(kube))
    rollout.start(
        kube.kube(),
        settings,
        version,
        lambda cluster, s: (TrackMetrics(100), TrackMetrics(100)),
        rollout.probe_agreement(settings.probe_photos, served.contract, "drseg"),
        clock=clock,
        sleep=clock.sleep,
        retry=True,
    )


def test_the_real_agreement_check_aborts_a_disagreeing_canary(served: Served) -> None:
    stable, other = served.servers["3"].http_url, served.servers["4"].http_url
    with triton_cluster() as kube:
        with pytest.raises(RolloutAborted, match=r"output agreement Dice 0\.\d+ < 0\.95"):
            _start(kube, _settings(stable, other, served.photos), "4", served)
        assert kube.deployment("triton-canary")["spec"]["replicas"] == 0
        _start(kube, _settings(stable, stable, served.photos), "3", served)
        assert rollout.status(kube.kube(), RolloutSettings())["status"] == "ready"


def test_cli_promote_moves_the_aliases_on_a_real_mlflow_server(
    mlflow_server: MlflowServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = mlflow_server.uri
    tracking = TrackingSettings(uri=uri, experiment=f"drseg-{uuid.uuid4().hex[:8]}")
    with stage_run(tracking, tmp_path / "home", "register", pipeline_run_id="p-1") as run:
        run_id = run.run_id
    name = f"seg-{uuid.uuid4().hex[:8]}"
    (tmp_path / "model").mkdir()
    files = write_model_files(tmp_path / "model")
    for _ in range(2):
        _register(uri, name, run_id, files)
    registry.promote(uri, name, 1)  # what stable serves before the rollout
    # The agreement check's contract source: that version's model.onnx alone.
    assert relu_runs(registry.download_onnx(uri, name, 2, tmp_path / "onnx"))

    with triton_cluster() as kube:
        clock = Clock(Controller(kube))
        rollout.start(
            kube.kube(),
            RolloutSettings(ready_timeout_s=3, poll_s=1, soak_s=0),
            2,
            lambda cluster, s: (TrackMetrics(100), TrackMetrics(100)),
            lambda cluster, s: 1.0,
            clock=clock,
            sleep=clock.sleep,
        )
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.setenv("DRSEG_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("DRSEG_TRACKING__URI", uri)
        monkeypatch.setenv("DRSEG_REGISTRY__MODEL_NAME", name)
        main(["rollout", "promote"])
        assert f"version 2 is stable and {name}@champion" in capsys.readouterr().out
        assert _aliases(uri, name) == {"champion": "2", "previous": "1"}
        stable = kube.deployment("triton")
        assert stable["metadata"]["labels"]["drseg.io/model-version"] == "2"
        assert kube.deployment("triton-canary")["spec"]["replicas"] == 0
        main(["rollout", "promote"])  # again: nothing moves
        assert _aliases(uri, name) == {"champion": "2", "previous": "1"}
        moves = [(m.alias, m.to_version) for m in registry.alias_history(uri, name)]
        assert moves.count(("champion", "2")) == 1
