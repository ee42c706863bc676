"""Serving end to end: a real Triton (pytriton's bundled tritonserver) on 127.0.0.1 serving a
repository written from a tiny exported model, queried with tritonclient over HTTP and gRPC.

Served outputs are compared with direct ONNX Runtime outputs on the same input: pytriton's
backend stub under the wrong numpy receives all-zero inputs without any error (STACK.md).
The client's preprocessing is compared with what ingest + clahe wrote for training.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from drseg.cli import main
from drseg.config import IngestSettings, ServeSettings, TrackingSettings
from drseg.contract import CONTRACT_KEY, read_contract
from drseg.data import dataset
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.legend import LEGEND_HEIGHT
from drseg.models.normalize import image_to_tensor
from drseg.serving.client import (
    OVERLAY_FILE,
    SUMMARY_FILE,
    PhotoResult,
    PreparedPhotograph,
    Protocol,
    lesion_masks,
    predict,
    prepare_photograph,
)
from drseg.serving.repository import ONNX_FILE, write_repository
from drseg.serving.server import resolve_model, running_server
from tests.export import CLAHE, clahe_dataset_from
from tests.ports import free_ports
from tests.serving import (
    VERSION,
    Served,
    direct,
    export_tiny,
    serve_settings,
    to_repository,
    url,
)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_outputs_equal_onnx_runtime(served: Served, protocol: Protocol) -> None:
    batch = np.random.default_rng(2).standard_normal((2, 3, 64, 96)).astype(np.float32)
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(url(served.server, protocol))
    try:
        request = module.InferInput("image", list(batch.shape), "FP32")
        request.set_data_from_numpy(batch)
        result = client.infer("drseg", [request], model_version=str(VERSION))
        served_output = result.as_numpy("probabilities")
    finally:
        client.close()
    expected = direct(served.onnx_path, batch)
    assert served_output.shape == (2, 4, 64, 96)
    assert expected.std() > 0.01, "a constant output would hide zeroed inputs"
    np.testing.assert_allclose(served_output, expected, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_predict_writes_masks_overlay_and_lesion_summary(
    served: Served, protocol: Protocol, tmp_path: Path
) -> None:
    out = tmp_path / "predictions"
    results = list(
        predict(served.photos, url(served.server, protocol), protocol, out, served.onnx_path)
    )
    assert all(isinstance(r, PhotoResult) for r in results)
    contract = read_contract(served.onnx_path)
    assert [r.folder for r in results] == [out / p.stem for p in served.photos]
    for result in results:
        assert isinstance(result, PhotoResult)
        prepared = prepare_photograph(result.photograph, contract)
        height, width = prepared.fov.shape
        probabilities = direct(served.onnx_path, prepared.model_input[None])[0]
        expected = lesion_masks(probabilities[:, :height, :width], prepared.fov, contract)
        assert expected.any() and not expected.all(), "masks should be neither empty nor full"
        summary = json.loads((result.folder / SUMMARY_FILE).read_text())
        assert summary["source_size"] == list(prepared.source_size)
        assert prepared.source_size[0] == 256
        assert summary["working_size"] == [width, height] == [192, height]
        assert summary["model"]["version"] == VERSION
        for cls, mask in zip(contract.classes, expected, strict=True):
            written = dataset.read_mask(result.folder / f"mask_{cls}.png")
            np.testing.assert_array_equal(written, mask)
            components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
            assert summary["classes"][cls]["lesion_pixels"] == int(mask.sum())
            assert summary["classes"][cls]["components"] == components
            assert summary["classes"][cls]["threshold"] == contract.thresholds[cls]
        assert summary["classes"] == result.classes
        overlay = cv2.imread(str(result.folder / OVERLAY_FILE))
        assert overlay.shape == (height + LEGEND_HEIGHT, width, 3)  # legend underneath
        assert result.infer_seconds <= result.total_seconds
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.integration
def test_health_readiness_and_metrics_are_tritons(served: Served) -> None:
    base = f"http://{served.server.http_url}"
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/drseg/versions/{VERSION}"):
        with urllib.request.urlopen(base + path, timeout=10) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(served.server.metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    assert f'nv_inference_request_success{{model="drseg",version="{VERSION}"}}' in metrics


@pytest.mark.integration
def test_predict_refuses_a_contract_that_does_not_fit_the_served_model(
    served: Served, tmp_path: Path
) -> None:
    proto = onnx.load(str(served.onnx_path))
    entry = next(p for p in proto.metadata_props if p.key == CONTRACT_KEY)
    contract = json.loads(entry.value)
    contract.update(classes=["MA", "HE"], thresholds={"MA": 0.5, "HE": 0.5})
    entry.value = json.dumps(contract)
    other = tmp_path / "other.onnx"
    onnx.save(proto, str(other))
    with pytest.raises(ValueError, match=r"4 output channels, the contract 2 classes.*other\.onnx"):
        list(predict(served.photos, served.server.http_url, "http", tmp_path / "out", other))
    assert not (tmp_path / "out").exists()


def _assert_training_input(
    prepared: PreparedPhotograph, ingested: Path, enhanced: Path, record_id: str
) -> None:
    """The client's images equal the ingest-stage photograph and field of view, and its
    model input equals the CLAHE-stage photograph normalised as training did."""
    np.testing.assert_array_equal(
        prepared.rgb, dataset.read_rgb(dataset.image_path(ingested, record_id))
    )
    np.testing.assert_array_equal(
        prepared.fov, dataset.read_mask(dataset.fov_path(ingested, record_id))
    )
    expected = image_to_tensor(dataset.read_rgb(dataset.image_path(enhanced, record_id))).numpy()
    height, width = prepared.fov.shape
    assert prepared.model_input.shape[1] % 32 == 0 and prepared.model_input.shape[2] % 32 == 0
    np.testing.assert_allclose(prepared.model_input[:, :height, :width], expected, atol=1e-6)


def test_prepare_photograph_is_the_training_preprocessing(
    exported: Path, synthetic_generic: Path, tmp_path: Path
) -> None:
    """Each photograph through ingest + clahe (what training read) and through the client."""
    enhanced = clahe_dataset_from(synthetic_generic, tmp_path)
    contract = read_contract(exported)
    for record in dataset.load_manifest(enhanced).records:
        photo = next((synthetic_generic / "images").glob(f"{record.id}.*"))
        prepared = prepare_photograph(photo, contract)
        _assert_training_input(prepared, tmp_path / "ingested", enhanced, record.id)


def test_predict_checks_output_folders_before_any_request(
    exported: Path, synthetic_generic: Path, tmp_path: Path
) -> None:
    """No server runs here: the problem is found before connecting."""
    photo = next((synthetic_generic / "images").iterdir())
    twin = tmp_path / "elsewhere" / photo.name
    twin.parent.mkdir()
    twin.write_bytes(photo.read_bytes())
    with pytest.raises(ValueError, match=rf"would both write .*{photo.stem}; rename one"):
        list(predict([photo, twin], "127.0.0.1:1", "http", tmp_path / "out", exported))


@pytest.mark.integration
def test_predict_reruns_into_the_same_out_skipping_what_the_same_version_answered(
    served: Served, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first, second = served.photos[:2]
    (done,) = predict([first], served.server.http_url, "http", out, served.onnx_path)
    assert isinstance(done, PhotoResult) and not done.skipped
    written = (out / first.stem / SUMMARY_FILE).read_bytes()
    (out / second.stem).mkdir()  # an interrupted earlier answer: no lesions.json
    again = list(predict([first, second], served.server.http_url, "http", out, served.onnx_path))
    assert [(type(o), getattr(o, "skipped", None)) for o in again] == [
        (PhotoResult, True),
        (PhotoResult, False),
    ]
    assert again[0].classes == done.classes  # type: ignore[union-attr]
    assert (out / first.stem / SUMMARY_FILE).read_bytes() == written
    assert (out / second.stem / SUMMARY_FILE).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_unreachable_server_is_one_line_and_exit_2(
    exported: Path,
    synthetic_generic: Path,
    tmp_path: Path,
    protocol: Protocol,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (port,) = free_ports(1)
    repository = tmp_path / "repo"
    write_repository(repository, exported, VERSION, ServeSettings())
    photo = next((synthetic_generic / "images").iterdir())
    argv = ["predict", str(photo), "--server", f"127.0.0.1:{port}", "--protocol", protocol]
    argv += ["--repository", str(repository), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(
        f"drseg predict: error: 127.0.0.1:{port}: no Triton server answers over "
        f"{protocol.upper()} ("
    )
    assert "drseg serve" in line and "Traceback" not in line


def _idrid_photograph(idrid_dir: Path) -> Path:
    return idrid_dir / "A. Segmentation" / "1. Original Images" / "a. Training Set" / "IDRiD_01.jpg"


@pytest.mark.idrid
def test_prepare_matches_training_on_a_full_size_idrid_jpeg(
    idrid_dir: Path, tmp_path: Path
) -> None:
    """The JPEG path (reduced-size DCT decode) at the real working width, 1024."""
    photo = _idrid_photograph(idrid_dir)
    source = tmp_path / "source"
    source.mkdir()
    (source / photo.name).symlink_to(photo)
    wide = IngestSettings(working_width=1024, layout="unlabelled", workers=1)
    ingest(source, tmp_path / "ingested", wide)
    clahe_dataset(tmp_path / "ingested", tmp_path / "clahe", CLAHE)
    record_id = dataset.load_manifest(tmp_path / "clahe").records[0].id
    contract = read_contract(export_tiny(tmp_path, wide))
    prepared = prepare_photograph(photo, contract)
    assert prepared.source_size == (4288, 2848)
    assert prepared.model_input.shape == (3, 704, 1024)
    _assert_training_input(prepared, tmp_path / "ingested", tmp_path / "clahe", record_id)


@pytest.mark.integration
@pytest.mark.idrid
def test_full_size_idrid_photograph_round_trip(idrid_dir: Path, tmp_path: Path) -> None:
    """4288 x 2848 JPEG -> 1024 x 680 working size -> one 1 x 3 x 704 x 1024 request."""
    photo = _idrid_photograph(idrid_dir)
    repository = tmp_path / "repo"
    onnx_path = to_repository(export_tiny(tmp_path, IngestSettings(working_width=1024)), repository)
    with running_server(repository, serve_settings(), log_file=tmp_path / "log") as server:
        (result,) = predict([photo], server.http_url, "http", tmp_path / "out", onnx_path)
    assert isinstance(result, PhotoResult)
    summary = json.loads((result.folder / SUMMARY_FILE).read_text())
    assert summary["source_size"] == [4288, 2848]
    assert summary["working_size"] == [1024, 680]
    assert summary["source_pixels_per_pixel"] == pytest.approx(4288 * 2848 / (1024 * 680))
    assert 0.5 < summary["fov_pixels"] / (1024 * 680) < 0.95
    assert cv2.imread(str(result.folder / "mask_HE.png")).shape[:2] == (680, 1024)


@pytest.fixture(scope="module")
def unversioned(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as the pipeline's export step writes it: no version in its contract."""
    out = tmp_path_factory.mktemp("unversioned") / "model.onnx"
    return _with_contract(exported, out, model_version=None)


def test_resolve_model_takes_the_latest_or_the_given_version(
    unversioned: Path, tmp_path: Path
) -> None:
    for version in (2, 5):
        write_repository(tmp_path / "repo", unversioned, version, ServeSettings())
    assert resolve_model(tmp_path / "repo", "drseg").version == 5
    chosen = resolve_model(tmp_path / "repo", "drseg", 2)
    assert (chosen.version, chosen.onnx_path) == (2, tmp_path / "repo" / "drseg" / "2" / ONNX_FILE)
    with pytest.raises(FileNotFoundError, match=r"no version 4 \(versions: \[2, 5\]\)"):
        resolve_model(tmp_path / "repo", "drseg", 4)
    with pytest.raises(FileNotFoundError, match=r"other/config\.pbtxt: no Triton model config"):
        resolve_model(tmp_path / "repo", "other")


def test_the_local_server_refuses_a_tensorrt_repository(unversioned: Path, tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"placeholder: the check reads config.pbtxt only")
    write_repository(tmp_path / "repo", unversioned, 1, ServeSettings(), plan_path=plan)
    with pytest.raises(ValueError, match=r"platform 'tensorrt_plan'; the local server runs ONNX"):
        resolve_model(tmp_path / "repo", "drseg")


def _with_contract(onnx_path: Path, out: Path, **changes: object) -> Path:
    """A copy of `onnx_path` whose contract has `changes`."""
    proto = onnx.load(str(onnx_path))
    entry = next(p for p in proto.metadata_props if p.key == CONTRACT_KEY)
    entry.value = json.dumps({**json.loads(entry.value), **changes})
    onnx.save(proto, str(out))
    return out


@pytest.mark.integration
def test_predict_uses_the_served_versions_contract_not_the_newest_in_the_repository(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Version 1 served, version 2 (other thresholds) newest in the repository: predict must
    apply version 1's thresholds and name version 1; asked for version 2, it refuses."""
    repository = tmp_path / "repo"
    classes = read_contract(exported).classes
    for version, threshold in ((1, 0.5), (2, 0.9)):
        thresholds = dict.fromkeys(classes, threshold)
        changed = _with_contract(
            exported, tmp_path / f"v{version}.onnx", model_version=None, thresholds=thresholds
        )
        write_repository(repository, changed, version, ServeSettings())
    write_synthetic_dataset(tmp_path / "source", n=1, seed=5, width=256)
    photo = next((tmp_path / "source" / "images").iterdir())
    settings = serve_settings()
    with running_server(repository, settings, version=1, log_file=tmp_path / "log") as server:
        argv = ["predict", str(photo), "--server", server.http_url]
        argv += ["--repository", str(repository), "--out", str(tmp_path / "out")]
        main(argv)
        summary = json.loads((tmp_path / "out" / photo.stem / SUMMARY_FILE).read_text())
        assert summary["model"]["version"] == 1
        assert {c["threshold"] for c in summary["classes"].values()} == {0.5}
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--version", "2", "--out", str(tmp_path / "other")])
        assert exit_.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert f"{server.http_url} serves versions [1], not version 2 whose contract" in line
        newest = repository / "drseg" / "2" / ONNX_FILE
        with pytest.raises(ValueError, match=r"serves versions \[1\], not version 2"):
            list(predict([photo], server.http_url, "http", tmp_path / "api", newest))
    assert not (tmp_path / "other").exists() and not (tmp_path / "api").exists()


@pytest.mark.integration
def test_predict_takes_the_contract_from_the_registry(
    served: Served,
    exported: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--model models:/NAME@champion: the registered model.onnx (exported before
    registration, so its contract names no version) pinned to the alias's version."""
    from drseg.registry import promote
    from drseg.tracking import stage_run
    from tests.test_registry import _register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingSettings(uri=uri, experiment="predict")
    with stage_run(tracking, tmp_path, "register", pipeline_run_id="p-predict") as run:
        run_id = run.run_id
    unversioned = _with_contract(exported, tmp_path / "model.onnx", model_version=None)
    (tmp_path / "model.pt").write_bytes(b"weights")
    for _ in range(VERSION):  # the served fixture serves version VERSION
        number = _register(uri, "lesions", run_id, (unversioned, tmp_path / "model.pt"))
    assert number == str(VERSION)
    promote(uri, "lesions", number)
    monkeypatch.setenv("DRSEG_TRACKING__URI", uri)
    photo = served.photos[0]
    argv = ["predict", str(photo), "--server", served.server.http_url]
    main([*argv, "--model", "models:/lesions@champion", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / photo.stem / SUMMARY_FILE).read_text())
    assert summary["model"]["version"] == VERSION
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model", "models:/lesions/1", "--out", str(tmp_path / "other")])
    assert exit_.value.code == 2
    # Above it, mlflow's download progress bar.
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("drseg")]
    assert f"serves versions [{VERSION}], not version 1" in line


@pytest.mark.integration
def test_predict_reads_the_contract_beside_a_served_plan(
    served: Served, unversioned: Path, tmp_path: Path
) -> None:
    """The repository a cluster's Triton serves as a TensorRT plan (a placeholder here: no
    TensorRT) gives predict its contract from the ONNX kept beside the plan; the local
    server stands in for the cluster's, serving the same version."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"placeholder: predict reads only the ONNX beside it")
    repository = tmp_path / "plan-repo"
    write_repository(repository, unversioned, VERSION, ServeSettings(), plan_path=plan)
    photo = served.photos[0]
    argv = ["predict", str(photo), "--server", served.server.http_url]
    main([*argv, "--repository", str(repository), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / photo.stem / SUMMARY_FILE).read_text())
    assert summary["model"]["version"] == VERSION
