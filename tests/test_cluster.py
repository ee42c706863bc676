"""Nightly retraining on a KFP endpoint: the recurring run's limits, the one-run-at-a-time
guard of a cron that only submits, and the service-account token a multi-user Kubeflow
asks of an in-cluster client. The real kfp.Client talks over a real socket to the
recording KFP API of tests/pipelines/test_compiled.py, which here also records headers and
lists runs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kfp.client import KF_PIPELINES_SA_TOKEN_PATH

from drseg.cli import build_parser, main
from drseg.cluster import ClusterError, schedule, submit
from drseg.config import ClusterSettings, Settings, load_settings
from tests.pipelines.test_compiled import _Recorder
from tests.test_manifests import find, pod_spec

Recorded = list[tuple[str, str, Any]]


class _KfpApi(_Recorder):
    """_Recorder that also keeps each request's Authorization header and answers a run list
    with `runs`."""

    runs: ClassVar[list[dict[str, str]]] = []
    authorization: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server names it)
        self.authorization.append(self.headers.get("Authorization"))
        if self.path.split("?")[0].endswith("/runs"):
            self.requests.append(("GET", self.path, None))
            data = json.dumps({"runs": self.runs, "total_size": len(self.runs)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self.authorization.append(self.headers.get("Authorization"))
        super().do_POST()


class Api:
    def __init__(self, host: str, handler: type[_KfpApi]) -> None:
        self.host = host
        self.handler = handler

    @property
    def requests(self) -> Recorded:
        return self.handler.requests

    def posted(self, suffix: str) -> list[Any]:
        return [b for m, p, b in self.requests if m == "POST" and p.split("?")[0].endswith(suffix)]


@pytest.fixture
def api() -> Iterator[Api]:
    handler = type("Handler", (_KfpApi,), {"requests": [], "runs": [], "authorization": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Api(f"http://127.0.0.1:{server.server_address[1]}", handler)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(environ={})


def test_schedule_runs_one_at_a_time_without_catchup_by_default(
    api: Api, settings: Settings
) -> None:
    cluster = ClusterSettings(kfp_host=api.host)
    schedule(settings, "s3://a", "s3://b", "0 0 3 * * *", "nightly", cluster)
    schedule(settings, "s3://a", "s3://b", "0 0 3 * * *", "catching-up", cluster, catchup=True)
    default, catching_up = api.posted("/recurringruns")
    assert int(default["max_concurrency"]) == 1
    assert default["no_catchup"] is True
    assert int(catching_up["max_concurrency"]) == 1
    assert catching_up["no_catchup"] is False


@pytest.mark.parametrize(("state", "started"), [("RUNNING", False), ("SUCCEEDED", True)])
def test_submit_unless_running_starts_nothing_while_a_run_is_active(
    api: Api, settings: Settings, state: str, started: bool
) -> None:
    api.handler.runs.append({"run_id": "old", "display_name": "nightly", "state": state})
    cluster = ClusterSettings(kfp_host=api.host)
    run_id = submit(settings, "s3://a", "s3://b", "nightly", cluster, unless_running=True)
    assert (run_id == "run-1") is started and (run_id is None) is not started
    assert len(api.posted("/runs")) == int(started)
    listed = [p for m, p, _ in api.requests if m == "GET" and "/runs" in p]
    assert listed and "experiment_id=exp-1" in listed[0]


def test_submit_authenticates_with_the_projected_service_account_token(
    api: Api, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("projected-token-1\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    cluster = ClusterSettings(kfp_host=api.host, kfp_auth="service-account-token")
    assert submit(settings, "s3://a", "s3://b", "nightly", cluster) == "run-1"
    assert api.handler.authorization
    assert set(api.handler.authorization) == {"Bearer projected-token-1"}


def test_a_missing_token_is_named_before_any_request(
    api: Api, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "none"))
    cluster = ClusterSettings(kfp_host=api.host, kfp_auth="service-account-token")
    with pytest.raises(ClusterError, match=r"none: no service-account token .*audience "):
        submit(settings, "s3://a", "s3://b", cluster=cluster)
    assert api.requests == []


def test_pipeline_submit_unless_running_says_why_and_exits_0(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api.handler.runs.append({"run_id": "old", "display_name": "nightly", "state": "PENDING"})
    monkeypatch.setenv("DRSEG_CLUSTER__KFP_HOST", api.host)
    main(["pipeline", "submit", "--source", "s3://a", "--pool", "s3://b", "--unless-running"])
    assert "no run started: a run of experiment 'drseg-training'" in capsys.readouterr().out
    assert api.posted("/runs") == []


def test_nightly_cronjob_authenticates_with_a_projected_token_and_has_a_deadline() -> None:
    """The CronJob path (kubectl kustomize + strict schema validation: test_manifests.py)."""
    cronjob = find("pipelines", "CronJob", "drseg-nightly")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert 0 < job["activeDeadlineSeconds"] <= 3600
    spec = pod_spec(cronjob)
    assert spec["serviceAccountName"] == "default-editor"
    (volume,) = spec["volumes"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert source["serviceAccountToken"]["expirationSeconds"] >= 600  # Kubernetes' minimum
    (container,) = spec["containers"]
    (mount,) = container["volumeMounts"]
    token = Path(mount["mountPath"]) / source["serviceAccountToken"]["path"]
    assert mount["name"] == volume["name"] and mount["readOnly"] is True
    assert str(token) == KF_PIPELINES_SA_TOKEN_PATH  # where kfp.Client looks by default
    environ = {e["name"]: e["value"] for e in container["env"]}
    cluster = load_settings(environ=environ).cluster
    assert cluster.kfp_auth == "service-account-token"
    args = build_parser().parse_args(container["args"])
    assert args.unless_running is True
