"""A real Prometheus (Debian's `prometheus` package, STACK.md) on 127.0.0.1 for the analysis
tests: scrapes the given targets every second and answers PromQL over its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ports import free_ports

READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Prometheus:
    url: str

    def query(self, promql: str) -> list[float]:
        """An instant query's vector as the list of its sample values (what Argo Rollouts'
        Prometheus provider calls `result`); refuses other result types."""
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(address, timeout=10) as reply:
            body: dict[str, Any] = json.load(reply)
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body["data"]["resultType"]
        return [float(sample["value"][1]) for sample in body["data"]["result"]]

    def wait_for(self, promql: str, timeout_s: float = 30.0) -> list[float]:
        """Poll `promql` until it returns a sample (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.query(promql)
            if found or time.monotonic() > deadline:
                assert found, f"no result for {promql} after {timeout_s:.0f} s"
                return found
            time.sleep(0.5)


@contextlib.contextmanager
def running_prometheus(work: Path, scrape_configs: list[dict[str, Any]]) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed: `apt-get install -y prometheus` (.ci/run does)")
    (port,) = free_ports(1)
    config = work / "prometheus.yml"
    global_ = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config.write_text(yaml.safe_dump({"global": global_, "scrape_configs": scrape_configs}))
    log = work / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read_text()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/-/ready", timeout=1) as reply,
            ):
                if reply.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
