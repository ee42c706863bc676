"""`drseg probe` against two real Triton servers (pytriton's bundled tritonserver, STACK.md)
on 127.0.0.1, on a labelled probe set ingested from synthetic photographs.

Stable serves version 3 (a tiny U-Net with random weights); a second server serves version
5, the same network with its segmentation bias at -20, so it finds no lesion at all. Random
weights find few lesions either, so the tests allow no Dice drop (max_dice_drop=0): stable's
small but non-zero Dice is then the bar version 5 must meet. The registered graphs are the
exported ONNX files; a mapping from version to file stands in for the registry's download.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from drseg.cli import main
from drseg.config import ExportSettings, RolloutSettings, ServeSettings
from drseg.data.ingest import ingest
from drseg.data.storage import upload_tree
from drseg.data.synthetic import write_synthetic_dataset
from drseg.deploy.probe import ProbeCase, load_probe_set, probe
from drseg.export.onnx_export import export_onnx
from drseg.serving.repository import write_repository
from drseg.serving.server import RunningServer, running_server
from tests.export import CLAHE, INGEST, THRESHOLDS, write_tiny_model
from tests.integration.s3_server import S3Server
from tests.ports import free_ports

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Tracks:
    stable: RunningServer
    blind: RunningServer
    """Version 5: finds no lesion."""
    graphs: dict[str, Path]
    """Registered graph of each version."""
    cases: list[ProbeCase]


def _export(folder: Path, version: int, seed: int, bias: float | None = None) -> Path:
    write_tiny_model(folder / "model", seed=seed)
    if bias is not None:
        weights = torch.load(folder / "model" / "model.pt")
        key = "unet.segmentation_head.0.bias"
        weights[key] = torch.full_like(weights[key], bias)
        torch.save(weights, folder / "model" / "model.pt")
    return export_onnx(
        folder / "model",
        THRESHOLDS,
        folder / "model.onnx",
        ExportSettings(),
        INGEST,
        CLAHE,
        model_version=version,
    ).path


@contextlib.contextmanager
def _serve(onnx_path: Path, version: int, folder: Path) -> Iterator[RunningServer]:
    write_repository(folder / "repo", onnx_path, version, ServeSettings())
    http, grpc, metrics = free_ports(3)
    settings = ServeSettings(http_port=http, grpc_port=grpc, metrics_port=metrics)
    with running_server(folder / "repo", settings, log_file=folder / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def tracks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracks]:
    work = tmp_path_factory.mktemp("probe")
    write_synthetic_dataset(work / "source", n=2, seed=5, width=256)
    ingest(work / "source", work / "probe-set", INGEST)
    graphs = {
        "3": _export(work / "v3", 3, seed=0),
        "5": _export(work / "v5", 5, seed=0, bias=-20.0),
    }
    with (
        _serve(graphs["3"], 3, work / "v3") as stable,
        _serve(graphs["5"], 5, work / "v5") as blind,
    ):
        yield Tracks(stable, blind, graphs, load_probe_set(work / "probe-set"))


def _settings(canary: str, stable: str) -> RolloutSettings:
    return RolloutSettings(canary_url=canary, stable_url=stable, max_dice_drop=0.0)


def test_the_probe_set_is_labelled(tracks: Tracks) -> None:
    assert len(tracks.cases) == 2
    assert any(mask.any() for case in tracks.cases for mask in case.truth.values())


def test_the_same_version_passes(tracks: Tracks) -> None:
    url = tracks.stable.http_url
    verdict = probe(tracks.cases, "3", tracks.graphs.__getitem__, _settings(url, url))
    assert verdict.passed, verdict.reason
    assert "version 3 serves its registered graph" in verdict.reason
    assert "\n" not in verdict.reason


def test_a_different_graph_fails_the_first_check(tracks: Tracks) -> None:
    """The canary says it serves version 3, but another graph is registered as version 3
    (version 5's: the same network with other weights)."""
    graphs = {**tracks.graphs, "3": tracks.graphs["5"]}
    url = tracks.stable.http_url
    verdict = probe(tracks.cases, "3", graphs.__getitem__, _settings(url, url))
    assert not verdict.passed
    assert verdict.reason.startswith("(1) version 3 on the canary differs from its registered")


def test_a_worse_model_fails_the_second_check(tracks: Tracks) -> None:
    settings = _settings(tracks.blind.http_url, tracks.stable.http_url)
    verdict = probe(tracks.cases, "5", tracks.graphs.__getitem__, settings)
    assert not verdict.passed
    assert verdict.reason.startswith("(2) ")
    assert "below stable's (version 3" in verdict.reason
    # Within a looser allowance the same canary passes: the check measured a drop, not an error.
    loose = settings.model_copy(update={"max_dice_drop": 1.0})
    assert probe(tracks.cases, "5", tracks.graphs.__getitem__, loose).passed


def test_a_canary_serving_another_version_fails(tracks: Tracks) -> None:
    url = tracks.stable.http_url
    verdict = probe(tracks.cases, "5", tracks.graphs.__getitem__, _settings(url, url))
    assert not verdict.passed
    assert "serves versions ['3']" in verdict.reason and "not 5" in verdict.reason


def test_an_unreachable_canary_fails_in_the_cli(
    tracks: Tracks,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    (port,) = free_ports(1)
    monkeypatch.setenv("DRSEG_HOME", str(tmp_path))
    monkeypatch.setenv("DRSEG_ROLLOUT__PROBE_SET", str(tracks.cases[0].photo.parents[1]))
    args = ["probe", "--version", "3", "--canary", f"127.0.0.1:{port}"]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--stable", tracks.stable.http_url])
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"drseg probe: fail: 127.0.0.1:{port}: ")


def test_truth_masks_follow_the_served_size() -> None:
    """A probe set ingested at another width than the model's: the truth is resized (nearest)
    to the served masks, and a class without a mask file is all-negative."""
    from drseg.deploy.probe import _truth

    mask = np.zeros((10, 16), bool)
    mask[2:6, 4:10] = True
    case = ProbeCase(Path("photo.tif"), {"HE": mask})
    truth = _truth(case, ("MA", "HE"), (20, 32))
    assert truth.shape == (2, 20, 32)
    assert not truth[0].any()
    assert truth[1].sum() == 4 * mask.sum()
    assert truth[1, 4:12, 8:20].all()


def test_the_probe_set_can_live_in_s3(
    tracks: Tracks,
    s3_server: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """As on the cluster: the Job downloads the probe set, then gives its verdict."""
    root = tracks.cases[0].photo.parents[1]
    upload_tree(root, f"s3://{s3_bucket}/probe-set", s3_server.settings())
    for key, value in {
        "DRSEG_HOME": str(tmp_path),
        "DRSEG_ROLLOUT__PROBE_SET": f"s3://{s3_bucket}/probe-set",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
        "AWS_REGION": s3_server.region,
    }.items():
        monkeypatch.setenv(key, value)
    url = tracks.blind.http_url
    with pytest.raises(SystemExit) as exited:
        main(["probe", "--version", "3", "--canary", url, "--stable", url])
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"drseg probe: fail: the canary at {url} serves versions ['5']")
