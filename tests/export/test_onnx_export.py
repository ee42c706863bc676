"""ONNX export: dynamic graph with the sigmoid inside, parity with PyTorch, and the serving
contract in the file's metadata. A tiny resnet18 U-Net with random weights keeps it fast."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from drseg.artifacts import ModelCard
from drseg.config import LESION_CLASSES, ClaheSettings, ExportSettings, IngestSettings
from drseg.contract import CONTRACT_KEY, ServingContract, pad_to_multiple, read_contract
from drseg.data import dataset
from drseg.export.onnx_export import (
    UNTUNED_THRESHOLD,
    ExportResult,
    ParityError,
    export_onnx,
    export_summary,
    with_thresholds,
)
from drseg.models.normalize import IMAGE_MEAN, IMAGE_STD
from drseg.models.unet import load_trained_model
from tests.export import (
    CLAHE,
    INGEST,
    THRESHOLDS,
    WORKING_WIDTH,
    clahe_dataset_from,
    write_tiny_model,
)


@dataclass(frozen=True)
class Exported:
    model_dir: Path
    thresholds: dict[str, float]
    dataset: Path
    result: ExportResult


@pytest.fixture(scope="module")
def exported(synthetic_generic: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """One export with a dataset given, shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("export")
    write_tiny_model(work / "model")
    clahe_dir = clahe_dataset_from(synthetic_generic, work)
    result = export_onnx(
        work / "model",
        THRESHOLDS,
        work / "out" / "model.onnx",
        ExportSettings(),
        INGEST,
        CLAHE,
        dataset_dir=clahe_dir,
        model_version=7,
    )
    return Exported(work / "model", THRESHOLDS, clahe_dir, result)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_has_named_dynamic_io_and_no_reconstruction(exported: Exported) -> None:
    proto = onnx.load(str(exported.result.path))
    assert [(v.name, _dims(v)) for v in proto.graph.input] == [
        ("image", ["batch", 3, "height", "width"])
    ]
    assert [(v.name, _dims(v)) for v in proto.graph.output] == [
        ("probabilities", ["batch", len(LESION_CLASSES), "height", "width"])
    ]
    assert "Sigmoid" in {node.op_type for node in proto.graph.node}
    assert not list(exported.result.path.parent.glob(".*")), "no temporary files left"


def test_parity_covers_random_and_real_inputs(exported: Exported) -> None:
    checks = exported.result.parity
    assert [c.input for c in checks] == ["random", "random", f"photograph {_first_id(exported)}"]
    assert checks[2].shape == (1, 3, 128, WORKING_WIDTH)  # 192 x 128 photograph, padded
    assert all(c.max_abs_diff <= ExportSettings().parity_tolerance for c in checks)
    summary = export_summary(exported.result)
    assert summary["parity_max_abs_diff"] == max(c.max_abs_diff for c in checks)
    assert json.loads(json.dumps(summary)) == summary


def _first_id(exported: Exported) -> str:
    return dataset.load_manifest(exported.dataset).records[0].id


def test_onnx_runtime_matches_torch_at_an_unseen_shape_with_probabilities(
    exported: Exported,
) -> None:
    """Odd batch and a 96 x 160 image: sizes are not frozen into the graph."""
    card = ModelCard.read(exported.model_dir)
    network = load_trained_model(exported.model_dir / "model.pt", card.model)
    image = np.random.default_rng(1).standard_normal((3, 3, 96, 160)).astype(np.float32)
    session = ort.InferenceSession(str(exported.result.path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"image": image})
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.from_numpy(image))[0]).numpy()
    assert probabilities.shape == (3, 4, 96, 160)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_contract_is_stored_in_the_file(exported: Exported) -> None:
    contract = read_contract(exported.result.path)
    assert contract == exported.result.contract
    assert contract.working_width == WORKING_WIDTH
    assert (contract.clahe_clip_limit, contract.clahe_tile_grid) == (2.0, 8)
    assert (contract.mean, contract.std) == (IMAGE_MEAN, IMAGE_STD)
    assert contract.classes == LESION_CLASSES
    assert contract.thresholds == THRESHOLDS
    assert (contract.encoder, contract.model_version) == ("resnet18", 7)
    assert contract.dataset_hash == "d" * 64
    assert (contract.input_name, contract.output_name) == ("image", "probabilities")
    assert contract.reconstruction_name is None


def test_contract_round_trips_through_json() -> None:
    contract = ServingContract(
        working_width=1024,
        clahe_clip_limit=2.0,
        clahe_tile_grid=8,
        mean=IMAGE_MEAN,
        std=IMAGE_STD,
        classes=("MA", "HE"),
        thresholds={"MA": 0.25, "HE": 0.5},
        encoder="resnet34",
        dataset_hash="abc",
    )
    assert ServingContract.from_json(contract.to_json(), "test") == contract


def test_contract_needs_one_threshold_per_class() -> None:
    with pytest.raises(ValueError, match=r"(?s)contract\.json: invalid serving contract.*HE"):
        ServingContract.from_json(
            json.dumps(
                {
                    "working_width": 1024,
                    "clahe_clip_limit": 2.0,
                    "clahe_tile_grid": 8,
                    "mean": IMAGE_MEAN,
                    "std": IMAGE_STD,
                    "classes": ["MA", "HE"],
                    "thresholds": {"MA": 0.25},
                    "encoder": "resnet34",
                    "dataset_hash": "abc",
                }
            ),
            "contract.json",
        )


def test_read_contract_names_the_file_and_the_fix(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx: ONNX file not found"):
        read_contract(tmp_path / "missing.onnx")
    proto = onnx.load(str(exported.result.path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match=rf"bare\.onnx: no '{CONTRACT_KEY}' metadata.*export_onnx"):
        read_contract(bare)


def test_reconstruction_output_on_request(exported: Exported, tmp_path: Path) -> None:
    result = export_onnx(
        exported.model_dir,
        exported.thresholds,
        tmp_path / "model.onnx",
        ExportSettings(reconstruction=True),
        INGEST,
        CLAHE,
    )
    proto = onnx.load(str(result.path))
    assert [o.name for o in proto.graph.output] == ["probabilities", "reconstruction"]
    assert _dims(proto.graph.output[1]) == ["batch", 3, "height", "width"]
    assert read_contract(result.path).reconstruction_name == "reconstruction"
    assert [c.input for c in result.parity] == ["random", "random"]


def test_reconstruction_refused_for_a_model_without_that_head(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "model", reconstruction=False)
    with pytest.raises(ValueError, match=r"no reconstruction head.*export\.reconstruction off"):
        export_onnx(
            tmp_path / "model",
            THRESHOLDS,
            tmp_path / "model.onnx",
            ExportSettings(reconstruction=True),
            INGEST,
            CLAHE,
        )


def test_parity_failure_raises_with_the_numbers_and_writes_nothing(
    exported: Exported, tmp_path: Path
) -> None:
    """A tolerance far below float32 rounding makes the real comparison fail."""
    with pytest.raises(ParityError, match=r"more than 1e-12 .*random \(2, 3, 64, 96\): \d"):
        export_onnx(
            exported.model_dir,
            exported.thresholds,
            tmp_path / "model.onnx",
            ExportSettings(parity_tolerance=1e-12),
            INGEST,
            CLAHE,
        )
    assert not list(tmp_path.iterdir())


def test_thresholds_must_cover_every_class(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"give exactly one threshold per class"):
        export_onnx(
            exported.model_dir, {"MA": 0.5}, tmp_path / "m.onnx", ExportSettings(), INGEST, CLAHE
        )


def test_a_fresh_export_is_untuned_and_evaluation_stamps_the_thresholds(
    exported: Exported, tmp_path: Path
) -> None:
    fresh = export_onnx(
        exported.model_dir, None, tmp_path / "fresh.onnx", ExportSettings(), INGEST, CLAHE
    )
    assert fresh.contract.thresholds == dict.fromkeys(LESION_CLASSES, UNTUNED_THRESHOLD)
    tuned = {"MA": 0.11, "HE": 0.22, "EX": 0.33, "SE": 0.44}
    stamped = with_thresholds(fresh.path, tuned, tmp_path / "served" / "model.onnx")
    assert read_contract(stamped) == fresh.contract.model_copy(update={"thresholds": tuned})
    before, after = onnx.load(str(fresh.path)), onnx.load(str(stamped))
    assert before.graph == after.graph  # the graph the gate scored, unchanged
    with pytest.raises(ValueError, match="give exactly one threshold per class"):
        with_thresholds(fresh.path, {"MA": 0.1}, tmp_path / "bad.onnx")


def test_dataset_made_with_other_settings_is_refused(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ingest\.working_width: dataset 192, settings 256"):
        export_onnx(
            exported.model_dir,
            exported.thresholds,
            tmp_path / "m.onnx",
            ExportSettings(),
            IngestSettings(working_width=256),
            ClaheSettings(),
            dataset_dir=exported.dataset,
        )
    with pytest.raises(ValueError, match=r"ingest-stage dataset \(no CLAHE"):
        export_onnx(
            exported.model_dir,
            exported.thresholds,
            tmp_path / "m.onnx",
            ExportSettings(),
            INGEST,
            CLAHE,
            dataset_dir=exported.dataset.parent / "ingested",
        )


def test_pad_to_multiple_repeats_the_edge() -> None:
    image = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    padded = pad_to_multiple(image, 4)
    assert padded.shape == (2, 4, 8)
    np.testing.assert_array_equal(padded[:, :3, :5], image)
    np.testing.assert_array_equal(padded[:, 3, :5], image[:, 2])
    np.testing.assert_array_equal(padded[:, :3, 7], image[:, :, 4])
    assert pad_to_multiple(padded, 4) is padded
