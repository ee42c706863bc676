"""No secret is printed: credentials inside URL settings, set in each place a user can put
them (YAML file, DRSEG_* variables, AWS_* variables), appear in no output, error message,
traceback or MLflow parameter."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from drseg.cli import main
from drseg.config import TrackingSettings
from drseg.secrets import redact, redact_logs
from drseg.tracking import TrackingError, stage_run
from tests.ports import free_ports

SECRETS = ("pw-tracking", "pw-endpoint", "AKIDSECRETKEY", "pw-kfp", "pw-env-endpoint", "tok-42")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("postgresql+psycopg2://mlflow:p@ss@db/m", "postgresql+psycopg2://***@db/m"),
        ("at 'http://AKID:ab/c+d@127.0.0.1:9000/b': refused", "at 'http://***@127.0.0.1:9000/b'"),
        (
            "https://h/p?a=1&token=abc&X-Amz-Signature=zz",
            "https://h/p?a=1&token=***&X-Amz-Signature=***",
        ),
        ("models:/drseg-lesions@champion", "models:/drseg-lesions@champion"),
        (
            "sqlite:////home/x/mlflow.db and s3://bucket/key",
            "sqlite:////home/x/mlflow.db and s3://",
        ),
    ],
)
def test_redact_masks_credentials_inside_urls(text: str, shown: str) -> None:
    assert shown in redact(text)
    assert redact(redact(text)) == redact(text)


def _secret_settings(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A YAML file and variables that hide a secret in every URL-valued setting they set."""
    config = tmp_path / "drseg.yaml"
    config.write_text(
        "storage:\n  endpoint_url: http://AKIDSECRETKEY:pw-endpoint@127.0.0.1:9000\n"
        "cluster:\n  kfp_host: https://admin:pw-kfp@kubeflow.example.org/pipeline\n"
        "rollout:\n  canary_url: http://127.0.0.1:8000/?token=tok-42\n"
    )
    environ = {
        "DRSEG_TRACKING__URI": "postgresql://mlflow:pw-tracking@127.0.0.1:1/mlflow",
        "AWS_ENDPOINT_URL_S3": "http://env:pw-env-endpoint@127.0.0.1:9000",
        "AWS_SECRET_ACCESS_KEY": "AKIDSECRETKEY",
    }
    return config, environ


def _assert_no_secret(text: str) -> None:
    found = [secret for secret in SECRETS if secret in text]
    assert not found, f"secrets {found} printed in:\n{text}"


def test_config_show_masks_secrets_from_yaml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config, environ = _secret_settings(tmp_path)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    main(["--config", str(config), "config", "show"])
    shown = capsys.readouterr().out
    _assert_no_secret(shown)
    assert "uri: postgresql://***@127.0.0.1:1/mlflow" in shown
    assert "endpoint_url: http://***@127.0.0.1:9000" in shown
    assert "kfp_host: https://***@kubeflow.example.org/pipeline" in shown


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://mlflow:pw-tracking@127.0.0.1:{port}/mlflow",
        "http://mlflow:pw-tracking@127.0.0.1:{port}",
    ],
    ids=["postgresql-without-driver", "http-server-down"],
)
def test_an_unreachable_tracking_server_does_not_print_its_password(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (port,) = free_ports(1)
    settings = TrackingSettings(uri=uri.format(port=port))
    with (
        pytest.raises(TrackingError) as refused,
        stage_run(settings, tmp_path, "evaluate", pipeline_run_id="cli-test"),
    ):
        pass
    assert "MLflow at " in str(refused.value) and "***@127.0.0.1" in str(refused.value)
    _assert_no_secret(str(refused.value))
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def _drseg(tmp_path: Path, *args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """`drseg ARGS` as a user runs it, with the secret settings and `environ` on top."""
    config, secret_environ = _secret_settings(tmp_path)
    env = {
        **os.environ,
        **secret_environ,
        **environ,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "AWS_MAX_ATTEMPTS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    command = [sys.executable, "-c", "from drseg.cli import main; main()"]
    return subprocess.run(
        [*command, "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_cli_errors_and_tracebacks_do_not_print_the_password(tmp_path: Path) -> None:
    """`drseg registry show` against a server that is down: the error line names the host
    only, and with --verbose the traceback (an MlflowException's, which names the URL) shows
    it masked."""
    (port,) = free_ports(1)
    uri = f"http://mlflow:pw-tracking@127.0.0.1:{port}"
    done = _drseg(tmp_path, "registry", "show", DRSEG_TRACKING__URI=uri)
    assert done.returncode == 2
    assert "cannot reach the MLflow tracking server at 127.0.0.1" in done.stderr, done.stderr
    _assert_no_secret(done.stdout + done.stderr)
    verbose = _drseg(tmp_path, "--verbose", "registry", "show", DRSEG_TRACKING__URI=uri)
    assert verbose.returncode == 2
    assert f"http://***@127.0.0.1:{port}" in verbose.stderr, verbose.stderr
    _assert_no_secret(verbose.stdout + verbose.stderr)


def test_an_unreachable_s3_endpoint_does_not_print_its_credentials(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    endpoint = f"http://AKIDSECRETKEY:pw-endpoint@127.0.0.1:{port}"
    done = _drseg(
        tmp_path,
        "ingest",
        "--source",
        "s3://bucket/photos",
        "--out",
        str(tmp_path / "out"),
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="AKIDSECRETKEY",
    )
    assert done.returncode == 2
    assert f"http://***@127.0.0.1:{port}" in done.stderr, done.stderr
    _assert_no_secret(done.stdout + done.stderr)


def test_mlflow_parameters_do_not_contain_credentials(tmp_path: Path) -> None:
    settings = TrackingSettings(experiment="secrets")
    params = {
        "source": "http://AKIDSECRETKEY:pw-endpoint@127.0.0.1:9000/bucket",
        "nested": {"uri": "postgresql://mlflow:pw-tracking@db/mlflow"},
    }
    with stage_run(
        settings, tmp_path, "ingest", pipeline_run_id="cli-secrets", config=params
    ) as run:
        run_id = run.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    logged = client.get_run(run_id).data.params
    assert logged == {
        "source": "http://***@127.0.0.1:9000/bucket",
        "nested.uri": "postgresql://***@db/mlflow",
    }


def test_drseg_run_masks_credentials_in_task_output() -> None:
    """`drseg run` copies each task's output (tracebacks included) to pipeline.log and, with
    --verbose, to the terminal."""
    import io

    from drseg.run import _TaskLog

    log, terminal = io.StringIO(), io.StringIO()
    tee = _TaskLog(log, terminal, verbose=True, display={})
    tee.write("MlflowException: API request to http://mlflow:pw-tracking@db:5000/api failed\n")
    for written in (log.getvalue(), terminal.getvalue()):
        assert "http://***@db:5000/api" in written
        _assert_no_secret(written)


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    redact_logs()
    redact_logs()  # idempotent: one wrapper, not two
    logging.getLogger("urllib3.connectionpool").warning(
        "Retrying after %s: %s", "connection refused", "http://mlflow:pw-tracking@db:5000/api"
    )
    (record,) = caplog.records
    assert record.getMessage() == "Retrying after connection refused: http://***@db:5000/api"
