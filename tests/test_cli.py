"""The `drseg` console script as a user types it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drseg.cli import main


def drseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("drseg")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, check=False)


def test_help_lists_one_verb_per_step() -> None:
    result = drseg("--help")
    assert result.returncode == 0
    for verb in ("run", "synth", "ingest", "clahe", "config"):
        assert f"    {verb} " in result.stdout
    assert "DRSEG_<SECTION>__<FIELD>" in result.stdout


def test_config_show_prints_effective_settings(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("clahe:\n  clip_limit: 3.5\n")
    result = drseg("--config", str(config), "config", "show")
    assert result.returncode == 0, result.stderr
    assert "clip_limit: 3.5" in result.stdout


def test_synth_ingest_clahe_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["synth", "--n", "3", "--width", "256", "--out", str(tmp_path / "src")])
    main(
        [
            "ingest",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "ds"),
            "--width",
            "128",
        ]
    )
    main(["clahe", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "eq")])
    printed = capsys.readouterr().out
    assert "records        3 (train" in printed
    assert "masks OD       3" in printed
    manifest = json.loads((tmp_path / "eq" / "manifest.json").read_text())
    assert manifest["stage"] == "clahe" and len(manifest["records"]) == 3


def test_errors_name_the_problem_and_exit_2(tmp_path: Path) -> None:
    result = drseg("ingest", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert f"{tmp_path / 'missing'}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [")
    result = drseg("--config", str(bad), "config", "show")
    assert result.returncode == 2 and "not valid YAML" in result.stderr
