"""The registry workflow against a real MLflow on a SQLite file: versions, aliases, history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.onnx
import mlflow.pyfunc
import numpy as np
import onnx
import onnxruntime
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from onnx import TensorProto, helper

from drseg.config import GateSettings, TrackingSettings
from drseg.contract import ServingContract
from drseg.evaluate.schema import ClassMetrics, MergedMetrics, Metrics
from drseg.gate import evaluate_gate
from drseg.registry import (
    RegistryError,
    alias_history,
    champion_version,
    download,
    linked_model_id,
    model_uri,
    promote,
    register_model,
    rollback,
    show,
)
from drseg.serving.client import prepare_photograph
from drseg.tracking import stage_run

DATASET = "sha256:" + "ab" * 32
GATE = GateSettings(class_minimums={}, max_regression=None)
"""The merged-Dice rule alone: these metrics have one class."""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow database for the module (creating one takes seconds); every test registers
    under a model name of its own."""
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def uri(home: Path) -> str:
    return f"sqlite:///{home}/mlflow.db"


@pytest.fixture(scope="module")
def run_id(home: Path) -> str:
    """The register stage's run, made the way the pipeline makes it."""
    settings = TrackingSettings(experiment="registry")
    with stage_run(settings, home, "register", pipeline_run_id="p-1") as run:
        return run.run_id


def write_model_files(out: Path) -> tuple[Path, Path]:
    """(model.onnx, model.pt) in `out`: a one-node ReLU graph with a dynamic batch, and fake
    weights."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out / "m.onnx")
    (out / "model.pt").write_bytes(b"fake weights")
    return out / "m.onnx", out / "model.pt"


def relu_runs(model: Path) -> bool:
    """Whether ONNX Runtime runs `model` as the ReLU of write_model_files."""
    session = onnxruntime.InferenceSession(str(model))
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], np.float32)
    return bool(np.array_equal(session.run(None, {"x": x})[0], np.maximum(x, 0)))


CONTRACT = ServingContract(
    working_width=128,
    clahe_clip_limit=2.0,
    clahe_tile_grid=8,
    mean=(0.5, 0.4, 0.3),
    std=(0.25, 0.2, 0.15),
    classes=("MA", "HE", "EX", "SE"),
    thresholds={"MA": 0.5, "HE": 0.5, "EX": 0.5, "SE": 0.5},
    encoder="segmenter",
    dataset_hash=DATASET,
)
"""How write_segmenter's stand-in takes a photograph (prepare_photograph)."""


def write_segmenter(out: Path) -> Path:
    """A stand-in for drseg's graph with its interface: image (N, 3, H, W) -> probabilities
    (N, 4, H, W), a 1x1 convolution and a sigmoid."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4, "H", "W"])
    weights = np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
        ],
        "segmenter",
        [image],
        [probs],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    path = out / "segmenter.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_model_files(tmp_path_factory.mktemp("model"))


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return f"seg-{request.node.name}"


def one_class_metrics(merged: float = 0.85, ma_dice: float = 0.5) -> Metrics:
    ma = ClassMetrics(
        aupr=0.4,
        dice=ma_dice,
        iou=0.33,
        threshold=0.3,
        per_image_dice_mean=ma_dice,
        images_with_lesion=3,
        images_excluded_empty=2,
        lesion_pixels=100,
    )
    return Metrics(
        split="val",
        images=5,
        dataset_hash=DATASET,
        scored="the graph",
        thresholds="cross_fitted",
        folds=5,
        classes={"MA": ma},
        mean_aupr=0.4,
        merged=MergedMetrics(dice=merged),
        notes=("How each number was computed. " * 150,),
    )


def _register(uri: str, name: str, run_id: str, files: tuple[Path, Path], **kw: Any) -> str:
    metrics = kw.pop("metrics", one_class_metrics())
    return register_model(
        uri,
        name,
        *files,
        run_id=run_id,
        dataset_hash=DATASET,
        metrics=metrics,
        verdict=kw.pop("verdict", evaluate_gate(metrics, GATE, None)),
        git_commit="0123456789abcdef",
        pipeline_run_id=kw.pop("pipeline_run_id", "p-1"),
    )


def _aliases(uri: str, name: str) -> dict[str, str]:
    model = MlflowClient(tracking_uri=uri).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _moves(uri: str, name: str) -> list[tuple[str, str, str | None, str | None]]:
    return [(m.action, m.alias, m.from_version, m.to_version) for m in alias_history(uri, name)]


def test_register_logs_the_model_and_sets_challenger(
    uri: str,
    name: str,
    run_id: str,
    files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _register(uri, name, run_id, files) == "1"
    folder = tmp_path / "checkpoint"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "model.json").write_text("{}")
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    onnx_path, _ = files
    second = _register(uri, name, run_id, (onnx_path, folder), pipeline_run_id="p-2")
    assert second == "2"
    assert _aliases(uri, name) == {"challenger": "2"}

    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version(name, "2")
    assert version.status == "READY"
    assert version.run_id == run_id
    assert version.tags["drseg.dataset_hash"] == DATASET
    assert version.tags["drseg.eval_dataset_hash"] == DATASET
    assert version.tags["drseg.git_commit"] == "0123456789abcdef"
    assert version.tags["drseg.pipeline_run_id"] == "p-2"
    assert version.tags["drseg.gate"] == "passed (1 rule)"
    # The tag leaves the notes out (a VARCHAR(5000) in SQL stores); the file keeps them.
    tagged = Metrics.from_json(version.tags["drseg.metrics"], "tag")
    assert tagged == one_class_metrics().model_copy(update={"notes": ()})
    assert len(version.tags["drseg.metrics"]) < 5000 < len(one_class_metrics().to_json())
    # Linked to its logged model the way mlflow.register_model links one: by the source
    # models:/<model id> (MLflow's SQL stores keep no ModelVersion.model_id).
    model_id = linked_model_id(version)
    assert model_id is not None and model_id.startswith("m-")
    assert version.source == f"models:/{model_id}"
    logged = client.get_logged_model(model_id)
    assert client.get_model_version_download_uri(name, "2") == logged.artifact_location
    [link] = json.loads(logged.tags["mlflow.modelVersions"])
    assert (link["name"], str(link["version"])) == (name, "2")
    assert logged.source_run_id == run_id
    assert logged.status == LoggedModelStatus.READY

    # Loaded the way export and serving will: by alias, never by "latest".
    number, fetched = download(uri, name, "challenger", tmp_path / "fetched")
    assert number == "2"
    assert (fetched / "checkpoint" / "model.json").read_text() == "{}"
    assert (fetched / "checkpoint" / "checkpoints" / "last.ckpt").read_bytes() == b"ckpt"
    assert Metrics.read(fetched / "evaluation" / "metrics.json") == one_class_metrics()
    gate = (fetched / "evaluation" / "gate.md").read_text()
    assert "| merged any-lesion Dice | ≥ 0.8000 | 0.8500 | pass |" in gate
    assert relu_runs(fetched / "model.onnx")

    # mlflow's own loaders take models:/<name>@<alias> through the process-wide tracking URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.onnx.load_model(model_uri(name, "challenger"))
    assert [node.op_type for node in loaded.graph.node] == ["Relu"]
    # The signature and input example come from the graph: a dynamic batch of 3 floats.
    info = mlflow.models.get_model_info(model_uri(name, "challenger"))
    assert info.model_id == model_id
    assert info.signature is not None
    assert info.signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3)}, "name": "x"}
    ]
    assert info.signature.outputs.input_names() == ["y"]
    example = json.loads((fetched / "serving_input_example.json").read_text())
    assert example == {"inputs": {"x": [[0.0, 0.0, 0.0]]}}
    with pytest.raises(RegistryError, match=r"has no @champion \(its aliases: challenger\)"):
        download(uri, name, "champion", tmp_path / "none")


def test_promote_and_rollback_move_aliases_and_record_every_move(
    uri: str, name: str, run_id: str, files: tuple[Path, Path]
) -> None:
    _register(uri, name, run_id, files)
    _register(uri, name, run_id, files)

    promote(uri, name, 1)
    assert _aliases(uri, name) == {"champion": "1", "challenger": "2"}
    promote(uri, name, "2", reason="canary healthy")
    assert _aliases(uri, name) == {"champion": "2", "previous": "1"}
    assert rollback(uri, name, reason="error rate") == "1"
    assert _aliases(uri, name) == {"champion": "1"}

    assert _moves(uri, name) == [
        ("register", "challenger", None, "1"),
        ("register", "challenger", "1", "2"),
        ("promote", "champion", None, "1"),
        ("promote", "previous", None, "1"),
        ("promote", "champion", "1", "2"),
        ("promote", "challenger", "2", None),
        ("rollback", "champion", "2", "1"),
        ("rollback", "previous", "1", None),
    ]
    history = alias_history(uri, name)
    assert [m.seq for m in history] == [1, 2, 3, 4, 4, 4, 5, 5]
    assert {m.reason for m in history if m.seq == 4} == {"canary healthy"}
    assert all(m.at.endswith("+00:00") for m in history)


def test_promoting_the_champion_again_changes_nothing(
    uri: str, name: str, run_id: str, files: tuple[Path, Path]
) -> None:
    _register(uri, name, run_id, files)
    promote(uri, name, 1)
    promote(uri, name, 1)
    assert _aliases(uri, name) == {"champion": "1"}
    assert _moves(uri, name) == [
        ("register", "challenger", None, "1"),
        ("promote", "champion", None, "1"),
        ("promote", "challenger", "1", None),
    ]


def test_show_lists_versions_aliases_tags_and_history(
    uri: str, name: str, run_id: str, files: tuple[Path, Path]
) -> None:
    _register(uri, name, run_id, files)
    _register(
        uri, name, run_id, files, metrics=one_class_metrics(merged=0.9), pipeline_run_id="p-7"
    )
    promote(uri, name, 2)
    rollback_reason = "canary 5xx | p99"
    promote(uri, name, 1)
    rollback(uri, name, reason=rollback_reason)

    text = show(uri, name)
    lines = text.splitlines()
    assert lines[0] == f"# Registered model `{name}`"
    versions = lines[: lines.index("## Alias history")]
    [v1] = [line for line in versions if line.startswith("| 1 |")]
    [v2] = [line for line in versions if line.startswith("| 2 |")]
    assert "| - |" in v1 and "| 0.850 |" in v1 and "| p-1 |" in v1
    assert "| champion |" in v2 and "| 0.900 |" in v2 and "| p-7 |" in v2
    assert f"| {DATASET[:19]} | 0123456789ab |" in v2
    assert "| passed (1 rule) |" in v2
    history = lines[lines.index("## Alias history") :]
    rows = [
        line.split(" | ")[2:6] for line in history if line.startswith("| ") and "|---" not in line
    ]
    assert rows[1:] == [
        ["register", "challenger", "-", "1"],
        ["register", "challenger", "1", "2"],
        ["promote", "champion", "-", "2"],
        ["promote", "challenger", "2", "-"],
        ["promote", "previous", "-", "2"],
        ["promote", "champion", "2", "1"],
        ["rollback", "champion", "1", "2"],
        ["rollback", "previous", "2", "-"],
    ]
    assert history[-1].endswith("| canary 5xx \\| p99 |")


def test_champion_version_is_what_evaluation_scores_beside_the_challenger(
    uri: str, name: str, run_id: str, files: tuple[Path, Path]
) -> None:
    assert champion_version(uri, name) is None  # no registered model yet
    _register(uri, name, run_id, files)
    assert champion_version(uri, name) is None  # a challenger, but no champion
    promote(uri, name, 1)
    assert champion_version(uri, name) == "1"


def test_promote_names_the_versions_there_are(
    uri: str, name: str, run_id: str, files: tuple[Path, Path]
) -> None:
    _register(uri, name, run_id, files)
    with pytest.raises(RegistryError, match=r"has no version 7 \(it has: 1\); pass one of those"):
        promote(uri, name, 7)
    with pytest.raises(RegistryError, match=r"version 'v1' is not a version number; pass one"):
        promote(uri, name, "v1")
    assert _aliases(uri, name) == {"challenger": "1"}


def test_unknown_model_is_named_with_the_fix(uri: str) -> None:
    for call in (
        lambda: promote(uri, "nope", 1),
        lambda: rollback(uri, "nope"),
        lambda: show(uri, "nope"),
        lambda: alias_history(uri, "nope"),
    ):
        with pytest.raises(RegistryError, match=r"no registered model 'nope' at sqlite:.*register"):
            call()


def test_rollback_without_previous_says_what_to_do(
    uri: str, name: str, run_id: str, files: tuple[Path, Path]
) -> None:
    _register(uri, name, run_id, files)
    with pytest.raises(RegistryError, match=r"no @previous .* \(@champion is unset\); promote"):
        rollback(uri, name)
    promote(uri, name, 1)
    _register(uri, name, run_id, files)
    promote(uri, name, 2)
    rollback(uri, name)
    with pytest.raises(RegistryError, match=r"@champion is 1\); promote a version by number"):
        rollback(uri, name)  # previous was cleared: no flipping back to version 2
    assert _aliases(uri, name) == {"champion": "1"}


def test_register_refuses_what_must_not_be_registered(
    uri: str, name: str, run_id: str, files: tuple[Path, Path], tmp_path: Path
) -> None:
    onnx_path, checkpoint = files
    low = one_class_metrics(merged=0.5)
    failed = evaluate_gate(low, GATE, None)
    with pytest.raises(RegistryError, match=r"gate failed \(failed: merged any-lesion Dice"):
        _register(uri, name, run_id, files, metrics=low, verdict=failed)
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx: no ONNX file"):
        _register(uri, name, run_id, (tmp_path / "missing.onnx", checkpoint))
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no checkpoint"):
        _register(uri, name, run_id, (onnx_path, tmp_path / "missing.pt"))
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match=r"bad\.onnx: not a valid ONNX model"):
        _register(uri, name, run_id, (tmp_path / "bad.onnx", checkpoint))
    with pytest.raises(RegistryError, match=r"no MLflow run 'r-0'.*pass the run id"):
        _register(uri, name, "r-0", files)
    with pytest.raises(ValueError, match=r"name 'a/b' cannot be used"):
        _register(uri, "a/b", run_id, files)
    assert MlflowClient(tracking_uri=uri).search_registered_models(f"name = '{name}'") == []


def test_model_uri_is_by_alias_and_lowercase() -> None:
    assert model_uri("seg", "champion") == "models:/seg@champion"
    for alias in ("Champion", "latest", "", "a b"):
        with pytest.raises(ValueError, match="aliases are lowercase"):
            model_uri("seg", alias)


def test_champion_loads_with_pyfunc_and_predicts_on_a_photograph(
    uri: str,
    run_id: str,
    files: tuple[Path, Path],
    synthetic_generic: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What an MLflow user does with the registered model: load @champion through pyfunc and
    call predict on a photograph prepared as the serving contract says."""
    graph = write_segmenter(tmp_path)
    _register(uri, "drseg-lesions", run_id, (graph, files[1]))
    promote(uri, "drseg-lesions", 1)
    photograph = sorted((synthetic_generic / "images").iterdir())[0]
    batch = prepare_photograph(photograph, CONTRACT).model_input[None]
    assert batch.shape[:2] == (1, 3) and batch.shape[3] == 128 and batch.std() > 0.1

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/drseg-lesions@champion")
    predicted = model.predict(batch)["probabilities"]

    expected = onnxruntime.InferenceSession(str(graph)).run(None, {"image": batch})[0]
    assert predicted.shape == (1, 4, *batch.shape[2:])
    np.testing.assert_allclose(predicted, expected, rtol=1e-6)
    assert model.metadata.get_input_schema().input_names() == ["image"]
    assert model.metadata.model_id == linked_model_id(
        MlflowClient(tracking_uri=uri).get_model_version("drseg-lesions", "1")
    )
