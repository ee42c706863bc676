"""The AnalysisTemplates' PromQL, run in a real Prometheus scraping real Triton servers.

Triton here is pytriton's bundled tritonserver (STACK.md), started with the same
`--metrics-config summary_latencies=true` as the Rollout's, serving toy models whose bound
functions behave as a canary would: healthy, failing a share of requests, slow, idle, barely
used. Prometheus scrapes it every second, and its scrape config labels each model's series
with a `rollouts_pod_template_hash` (from the `model` label) and a `namespace`, the two labels
the PodMonitor gives a canary pod's series on a cluster, so each model stands for one canary.
Each query is the template's own, with the arguments filled in as Argo Rollouts fills them;
its successCondition is evaluated on the result the way Argo's Prometheus provider passes a
vector (`result` = the list of sample values). The measurement window is shortened to 30 s
and the minimum request count to 20, the only arguments changed from the manifests.
"""

from __future__ import annotations

import contextlib
import os
import re
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as triton_http
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from tests.deploy.prometheus_server import Prometheus, running_prometheus
from tests.ports import free_ports
from tests.test_manifests import find

pytestmark = pytest.mark.integration

NAMESPACE = "drseg-test"
ARGS = {"namespace": NAMESPACE, "window": "30s", "min-requests": "20", "max-p99-ms": "100"}
SLOW_S = 0.2
FAILING_SHARE = 4
"""Every 4th request to the failing model fails (25 %)."""
MIN_REQUESTS = int(ARGS["min-requests"])

Floats = npt.NDArray[np.float32]


def _healthy(x: Floats) -> dict[str, Floats]:
    return {"y": x * 2}


def _failing() -> Callable[..., dict[str, Floats]]:
    calls = iter(range(1, 1_000_000))

    def infer(x: Floats) -> dict[str, Floats]:
        if next(calls) % FAILING_SHARE == 0:
            raise ValueError("the canary fails this request")
        return _healthy(x)

    return infer


def _slow(x: Floats) -> dict[str, Floats]:
    time.sleep(SLOW_S)
    return _healthy(x)


@dataclass(frozen=True)
class ToyTriton:
    http_url: str
    metrics_target: str


@contextlib.contextmanager
def toy_triton(
    models: dict[str, Callable[..., dict[str, Floats]]], ports: list[int]
) -> Iterator[ToyTriton]:
    """A real tritonserver on `ports` (http, grpc, metrics) serving one toy model per entry."""
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    http, grpc, metrics = ports
    triton = Triton(
        config=TritonConfig(
            http_address="127.0.0.1",
            http_port=http,
            grpc_address="127.0.0.1",
            grpc_port=grpc,
            metrics_address="127.0.0.1",
            metrics_port=metrics,
            metrics_config=["summary_latencies=true"],
            exit_timeout_secs=1,
        )
    )
    try:
        for name, infer in models.items():
            triton.bind(
                model_name=name,
                infer_func=batch(infer),
                inputs=[Tensor(name="x", dtype=np.float32, shape=(4,))],
                outputs=[Tensor(name="y", dtype=np.float32, shape=(4,))],
                config=ModelConfig(max_batch_size=1),
                strict=True,
            )
        triton.run()
        yield ToyTriton(f"127.0.0.1:{http}", f"127.0.0.1:{metrics}")
    finally:
        triton.stop()


def send(url: str, model: str, n: int) -> int:
    """`n` requests one after another; returns how many failed."""
    client = triton_http.InferenceServerClient(url, network_timeout=30)
    failed = 0
    try:
        for _ in range(n):
            request = triton_http.InferInput("x", [1, 4], "FP32")
            request.set_data_from_numpy(np.ones((1, 4), np.float32))
            try:
                client.infer(model, [request])
            except triton_http.InferenceServerException:
                failed += 1
    finally:
        client.close()
    return failed


def scrape_config(target: str) -> dict[str, Any]:
    """What the PodMonitor does for a canary pod: namespace and pod-template-hash labels."""
    return {
        "job_name": target,
        "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
        "metric_relabel_configs": [
            {"source_labels": ["model"], "target_label": "rollouts_pod_template_hash"}
        ],
    }


def _condition(expression: str, result: list[float]) -> bool:
    """Argo's successCondition (expr language) for the forms the templates use."""
    python = expression.replace("&&", " and ").replace("||", " or ")
    assert re.fullmatch(r"[\w\s\[\]().<>=!,]+", python), f"unexpected expression {expression}"
    return bool(eval(python, {"__builtins__": {"len": len}}, {"result": result}))


def measure(
    prometheus: Prometheus, template_name: str, canary: str, window: str = ARGS["window"]
) -> tuple[bool, list[float]]:
    """One measurement of the template's metric for the canary whose pod-template hash is
    `canary` over `window`: (successCondition, result)."""
    template = find("base", "AnalysisTemplate", template_name)
    values = {a["name"]: a.get("value") for a in template["spec"]["args"]}
    values.update({k: v for k, v in ARGS.items() if k in values}, **{"canary-hash": canary})
    values["window"] = window
    (metric,) = template["spec"]["metrics"]

    def fill(text: str) -> str:
        filled = re.sub(r"\{\{args\.([\w-]+)\}\}", lambda m: str(values[m.group(1)]), text)
        assert "{{" not in filled
        return filled

    result = prometheus.query(fill(metric["provider"]["prometheus"]["query"]))
    return _condition(fill(metric["successCondition"]), result), result


@dataclass(frozen=True)
class Scenario:
    prometheus: Prometheus
    failed: dict[str, int]


def _counted(prometheus: Prometheus, model: str, at_least: int) -> None:
    """Wait (bounded) until Prometheus has scraped `at_least` requests of `model`."""
    selector = f'{{rollouts_pod_template_hash="{model}"}}'
    query = (
        f"sum(nv_inference_request_success{selector}) + "
        f"sum(nv_inference_request_failure{selector}) >= {at_least}"
    )
    prometheus.wait_for(query)


@pytest.fixture(scope="module")
def canaries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Five canaries under real traffic, scraped until Prometheus has seen every request."""
    work = tmp_path_factory.mktemp("analysis")
    models = {
        "healthy": _healthy,
        "failing": _failing(),
        "slow": _slow,
        "sparse": _healthy,
        "idle": _healthy,
    }
    traffic = {"healthy": 60, "failing": 60, "slow": 30, "sparse": 5}
    with (
        toy_triton(models, free_ports(3)) as triton,
        running_prometheus(work, [scrape_config(triton.metrics_target)]) as prometheus,
    ):
        prometheus.wait_for(f'up{{job="{triton.metrics_target}"}} == 1')
        failed: dict[str, int] = {}

        def run(model: str, n: int) -> None:
            failed[model] = send(triton.http_url, model, n)

        threads = [threading.Thread(target=run, args=item) for item in traffic.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for model, n in traffic.items():
            _counted(prometheus, model, n)
        yield Scenario(prometheus, failed)


def test_traffic_was_real(canaries: Scenario) -> None:
    assert canaries.failed == {"healthy": 0, "failing": 15, "slow": 0, "sparse": 0}


def test_a_healthy_canary_passes(canaries: Scenario) -> None:
    ok, result = measure(canaries.prometheus, "triton-success-rate", "healthy")
    assert ok and result == [1.0]
    ok, (p99_ms,) = measure(canaries.prometheus, "triton-latency-p99", "healthy")
    assert ok and 0 < p99_ms < SLOW_S * 1000


@pytest.mark.parametrize("canary", ["idle", "sparse"])
@pytest.mark.parametrize("template", ["triton-success-rate", "triton-latency-p99"])
def test_no_or_too_little_traffic_never_passes(
    canaries: Scenario, canary: str, template: str
) -> None:
    assert measure(canaries.prometheus, template, canary) == (False, [])


def test_a_canary_failing_a_share_of_requests_fails(canaries: Scenario) -> None:
    ok, (rate,) = measure(canaries.prometheus, "triton-success-rate", "failing")
    assert not ok
    assert rate == pytest.approx(1 - 1 / FAILING_SHARE, abs=0.05)
    # Its successful requests are fast: latency alone would not have caught it.
    assert measure(canaries.prometheus, "triton-latency-p99", "failing")[0]


def test_a_slow_canary_fails_on_latency(canaries: Scenario) -> None:
    ok, (p99_ms,) = measure(canaries.prometheus, "triton-latency-p99", "slow")
    assert not ok and p99_ms >= SLOW_S * 1000
    assert measure(canaries.prometheus, "triton-success-rate", "slow")[0]


def test_a_restarted_canary_does_not_pass_on_the_reset(tmp_path: Path) -> None:
    """Half its requests fail, then the server restarts on the same address (a container
    restart: same pod, counters back to 0) and serves healthy traffic. Its counters now read
    0 failures, but the window still holds the failures from before the restart: it is
    sized to the scenario's own duration, which a loaded machine stretches."""
    flaky = {"restarted": _failing()}
    ports = free_ports(3)
    target = f"127.0.0.1:{ports[2]}"
    with running_prometheus(tmp_path, [scrape_config(target)]) as prometheus:
        with toy_triton(flaky, ports) as triton:
            prometheus.wait_for(f'up{{job="{target}"}} == 1')
            started = time.monotonic()
            assert send(triton.http_url, "restarted", 40) == 10
            _counted(prometheus, "restarted", 40)
        with toy_triton({"restarted": _healthy}, ports) as triton:
            selector = '{rollouts_pod_template_hash="restarted"}'
            # The reset is visible only once Prometheus has scraped the restarted counters
            # below their old values; traffic before that scrape would hide it.
            prometheus.wait_for(f"sum(nv_inference_request_success{selector}) == 0")
            assert send(triton.http_url, "restarted", 40) == 0
            prometheus.wait_for(f"sum(nv_inference_request_success{selector}) == 40")
            assert prometheus.query(f"sum(nv_inference_request_failure{selector})") == [0.0]
            window = f"{int(time.monotonic() - started) + int(ARGS['window'][:-1])}s"
            ok, (rate,) = measure(prometheus, "triton-success-rate", "restarted", window)
            assert not ok
            assert rate == pytest.approx(70 / 80, abs=0.05)
