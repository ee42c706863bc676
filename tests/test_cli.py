"""The `drseg` console script as a user types it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drseg.cli import main
from tests.ports import free_ports


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


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The error line `drseg argv` prints when it cannot act, with exit status 2."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Above it there may be log records (MLflow creating a new database), never more of it.
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("drseg ")] == lines[-1:], err
    return lines[-1]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty drseg home; no DRSEG_* settings from the caller's environment."""
    for variable in os.environ:
        if variable.startswith("DRSEG_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("DRSEG_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "environ", "line"),
    [
        (
            ["config", "show"],
            {"DRSEG_FINETUNE__PATCH_SIZE": "100"},
            "drseg config: error: invalid settings: finetune.patch_size (from "
            "DRSEG_FINETUNE__PATCH_SIZE): 100 is not a multiple of 32",
        ),
        (
            ["ingest", "--source", "src", "--out", "out", "--width", "10"],
            {},
            "drseg ingest: error: invalid option: ingest.working_width (from the command "
            "line): working width 10 px is outside 128..8192: below 128 px lesions vanish",
        ),
        (["registry", "promote", "abc"], {}, "version 'abc' is not a version number"),
        (["registry", "promote"], {}, "registry promote needs the VERSION to promote"),
        (
            ["registry", "show"],
            {},
            "drseg registry: error: no registered model 'drseg-lesions' at sqlite:",
        ),
        (
            [
                "evaluate",
                "--onnx",
                "nowhere",
                "--dataset",
                "nothing",
                "--out",
                "o",
                "--served",
                "s",
            ],
            {"DRSEG_TRACKING__ENABLED": "false"},
            "drseg evaluate: error: nowhere/model.onnx: ONNX file not found; pass the model.onnx",
        ),
    ],
)
def test_a_user_error_is_one_line_with_the_fix_and_exit_2(
    argv: list[str],
    environ: dict[str, str],
    line: str,
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(workspace)
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    assert line in _fails(argv, capsys)


def test_an_unreachable_mlflow_is_one_line_without_credentials(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    [port] = free_ports(1)  # nothing listens there
    monkeypatch.setenv("DRSEG_TRACKING__URI", f"http://user:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    line = _fails(["registry", "show"], capsys)
    assert line == (
        "drseg registry: error: cannot reach the MLflow tracking server at 127.0.0.1 "
        "(Connection refused); start it, or point tracking.uri (DRSEG_TRACKING__URI) at one "
        "that runs"
    )


def test_verbose_adds_the_traceback(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(workspace)
    with pytest.raises(SystemExit) as exited:
        main(["--verbose", "registry", "promote", "abc"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RegistryError" in err
    assert err.strip().splitlines()[-1].startswith("drseg registry: error: version 'abc'")
