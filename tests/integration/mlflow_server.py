"""A real `mlflow server` on 127.0.0.1 for integration tests, with artifacts in SeaweedFS S3.

Started as STACK.md describes: job execution off (else ~7 extra workers and a 25 s start), one
uvicorn worker, its own process group so that stopping the group stops every worker. The
server proxies artifacts (--serve-artifacts) to s3://<bucket>/mlartifacts, so clients need
no S3 credentials: only the server gets them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.s3_server import S3Server, _log_tail
from tests.ports import free_ports

READY_TIMEOUT_S = 90.0
"""~10 s on an idle machine; the shared 2-core machine can be several times slower."""
STOP_TIMEOUT_S = 15.0
ARTIFACTS_PREFIX = "mlartifacts"


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    bucket: str
    """Artifacts of every run land under s3://<bucket>/mlartifacts/<experiment id>/<run id>/."""


def _wait_ready(proc: subprocess.Popen[bytes], health_url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"mlflow server exited with {proc.returncode}; tail of {log}:\n{_log_tail(log)}"
            )
        try:
            with urllib.request.urlopen(health_url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(
        f"mlflow server not ready at {health_url} after {READY_TIMEOUT_S:.0f} s; "
        f"tail of {log}:\n{_log_tail(log)}"
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM the whole group, then SIGKILL what is left; fails if a worker survives."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _group_alive(proc.pid):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader; its workers are reparented and reaped by init
            if not _group_alive(proc.pid):
                return
            time.sleep(0.1)
    pytest.fail(
        f"mlflow server group {proc.pid} survived SIGKILL; tail of {log}:\n{_log_tail(log)}"
    )


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """One MLflow server for the whole session; tests use their own experiment names."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    if not mlflow_cli.is_file():
        pytest.skip(f"mlflow CLI not found next to {sys.executable} (install the mlflow package)")
    base = tmp_path_factory.mktemp("mlflow-server")
    bucket = f"drseg-mlflow-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    [port] = free_ports(1)
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    command = [
        str(mlflow_cli), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", f"s3://{bucket}/{ARTIFACTS_PREFIX}",
    ]  # fmt: skip
    log = base / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base, start_new_session=True
        )
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_ready(proc, f"{uri}/health", log)
        yield MlflowServer(uri=uri, bucket=bucket)
    finally:
        _stop_group(proc, log)
