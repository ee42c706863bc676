"""Every step from a trained model to a Triton repository, by hand, as the pipeline runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drseg.cli import main
from drseg.contract import read_contract
from drseg.evaluate.schema import Metrics
from tests.export import INGEST, clahe_dataset_from, write_tiny_model


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return int(exited.value.code or 0)


def test_export_evaluate_gate_tensorrt_repository_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DRSEG_CONFIG", raising=False)
    monkeypatch.setenv("DRSEG_TRACKING__ENABLED", "false")
    monkeypatch.setenv("DRSEG_INGEST__WORKING_WIDTH", str(INGEST.working_width))
    monkeypatch.setenv("DRSEG_FINETUNE__PATCH_SIZE", "64")  # within the small width
    monkeypatch.setenv("DRSEG_PRETRAIN__CROP_SIZE", "64")
    monkeypatch.setenv("DRSEG_CLAHE__WORKERS", "1")
    main(["synth", "--n", "4", "--width", "256", "--out", str(tmp_path / "src")])
    clahe_dir = clahe_dataset_from(tmp_path / "src", tmp_path)
    write_tiny_model(tmp_path / "model")

    main(["export", "--model", str(tmp_path / "model"), "--dataset", str(clahe_dir),
          "--out", str(tmp_path / "exported")])  # fmt: skip
    assert "thresholds untuned until `drseg evaluate`" in capsys.readouterr().out
    main(["evaluate", "--onnx", str(tmp_path / "exported"), "--dataset",
          str(tmp_path / "ingested"), "--out", str(tmp_path / "eval"), "--served",
          str(tmp_path / "served"), "--split", "train"])  # fmt: skip
    metrics = Metrics.read(tmp_path / "eval" / "metrics.json")
    assert metrics.thresholds == "cross_fitted" and metrics.split == "train"
    assert (tmp_path / "eval" / "no_champion.txt").read_text().startswith("tracking is off")
    served = read_contract(tmp_path / "served" / "model.onnx")
    assert served.thresholds == metrics.shipped_thresholds()

    # An untrained model: the default gate fails it, and says so with exit status 1.
    verdict = tmp_path / "verdict.json"
    assert _exit_code(["gate", "--metrics", str(tmp_path / "eval" / "metrics.json"),
                       "--verdict", str(verdict)]) == 1  # fmt: skip
    assert json.loads(verdict.read_text())["passed"] is False

    main(["tensorrt", "--served", str(tmp_path / "served"), "--dataset",
          str(tmp_path / "ingested"), "--out", str(tmp_path / "engine")])  # fmt: skip
    assert '"served_format": "onnx"' in capsys.readouterr().out
    main(["repository", "--served", str(tmp_path / "served"), "--engine",
          str(tmp_path / "engine"), "--version", "5", "--out", str(tmp_path / "repo")])  # fmt: skip
    assert "drseg version 5 (onnx)" in capsys.readouterr().out
    repository_graph = tmp_path / "repo" / "drseg" / "5" / "model.onnx"
    assert read_contract(repository_graph).thresholds == metrics.shipped_thresholds()
