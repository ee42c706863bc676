"""Canary rollout as a state machine, through `KubeCluster` (the kubernetes client) against
kmock's API emulator and a fake controller (tests/kube_emulator.py).

What the emulator does and does not do is in tests/kube_emulator.py: it keeps objects and
answers the client's requests, but ignores label selectors, replaces lists on patch, fills
no server fields and runs no controller, so `Controller` marks Deployments ready (or never
ready) when the rollout sleeps between polls. Metrics and output agreement are injected
here; the real agreement check against two Triton servers is in
tests/integration/test_rollout_servers.py, and promotion on a real MLflow server there too.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from drseg import rollout
from drseg.cli import main
from drseg.config import RolloutSettings
from drseg.rollout import Cluster, RolloutAborted, RolloutError, TrackMetrics
from tests.kube_emulator import (
    DEPLOYMENTS,
    ISTIO_OVERLAY,
    MANIFESTS,
    PODS,
    SERVICES,
    VIRTUAL_SERVICES,
    Clock,
    Controller,
    Emulator,
    manifest,
    triton_cluster,
)

ANNOTATION = "drseg.io/rollout-state"
ISTIO = {"virtual_service": "triton"}


@pytest.fixture
def kube() -> Iterator[Emulator]:
    with triton_cluster() as cluster:
        yield cluster


def settings(**kw: Any) -> RolloutSettings:
    return RolloutSettings(total_replicas=4, ready_timeout_s=3, poll_s=1, soak_s=60, **kw)


def metrics(fail: float = 0.0, latency: float = 100.0) -> rollout.MetricsFn:
    def fn(cluster: Cluster, s: RolloutSettings) -> tuple[TrackMetrics, TrackMetrics]:
        return TrackMetrics(1000, 0, 0, 100.0), TrackMetrics(
            1000 * (1 - fail), 1000 * fail, 0, latency
        )

    return fn


def agree(dice: float) -> rollout.AgreementFn:
    return lambda cluster, s: dice


def run_start(
    kube: Emulator, version: int = 7, failing: tuple[str, ...] = (), **kw: Any
) -> rollout.State:
    clock = Clock(Controller(kube, failing))
    defaults: dict[str, Any] = {"metrics": metrics(), "agreement": agree(0.99)}
    return rollout.start(
        kube.kube(),
        kw.pop("settings", settings()),
        version,
        clock=clock,
        sleep=clock.sleep,
        **{**defaults, **kw},
    )


def state(kube: Emulator) -> dict[str, Any]:
    return dict(json.loads(kube.deployment("triton-canary")["metadata"]["annotations"][ANNOTATION]))


def env(d: dict[str, Any]) -> dict[str, str]:
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in c.get("env", [])}


def weights(kube: Emulator) -> dict[str, int]:
    virtual = kube.get(VIRTUAL_SERVICES, "triton")
    assert virtual is not None
    (rule,) = virtual["spec"]["http"]
    return {r["destination"]["subset"]: r["weight"] for r in rule["route"]}


def test_start_then_promote_moves_stable_and_champion(kube: Emulator) -> None:
    assert run_start(kube).status == "ready"
    canary = kube.deployment("triton-canary")
    assert canary["spec"]["replicas"] == 2  # ceil(0.5 * 4)
    assert canary["spec"]["selector"]["matchLabels"]["track"] == "canary"
    assert canary["spec"]["template"]["metadata"]["labels"]["track"] == "canary"
    assert env(canary)["MODEL_REPOSITORY_S3_URI"] == "s3://drseg-models/triton/7"
    assert "env" not in kube.deployment("triton")["spec"]["template"]["spec"]["containers"][0]
    assert weights(kube) == {"stable": 100, "canary": 0}  # no Istio in the settings
    moved: list[tuple[str, str]] = []
    rollout.promote(kube.kube(), settings(), lambda v, r: moved.append((v, r)))
    assert moved and moved[0][0] == "7"
    stable = kube.deployment("triton")
    assert env(stable)["MODEL_REPOSITORY_S3_URI"] == "s3://drseg-models/triton/7"
    assert stable["spec"]["template"]["metadata"]["labels"]["drseg.io/model-version"] == "7"
    assert stable["spec"]["selector"]["matchLabels"]["track"] == "stable"
    assert kube.deployment("triton-canary")["spec"]["replicas"] == 0
    assert state(kube)["status"] == "promoted"
    # Re-running is safe: start is a no-op, promote only re-asserts the (idempotent) alias.
    writes = kube.writes()
    assert run_start(kube).status == "promoted"
    rollout.promote(kube.kube(), settings(), lambda v, r: moved.append((v, r)))
    assert kube.writes() == writes and len(moved) == 2


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"failing": ("triton-canary",)}, "canary not ready: 0/1"),
        ({"metrics": metrics(fail=0.2)}, "failure rate"),
        ({"metrics": metrics(latency=500.0)}, "latency"),
        ({"agreement": agree(0.5)}, "agreement Dice 0.5000"),
    ],
)
@pytest.mark.parametrize("routing", [{}, ISTIO], ids=["replicas", "istio"])
def test_failed_check_aborts_and_leaves_stable(
    kube: Emulator, kw: dict[str, Any], why: str, routing: dict[str, str]
) -> None:
    before = kube.deployment("triton")
    with pytest.raises(RolloutAborted, match=why):
        run_start(kube, settings=settings(**routing), **kw)
    assert kube.deployment("triton")["spec"] == before["spec"]
    assert kube.deployment("triton-canary")["spec"]["replicas"] == 0
    assert weights(kube) == {"stable": 100, "canary": 0}
    recorded = state(kube)
    assert recorded["status"] == "aborted" and why in recorded["reason"]
    with pytest.raises(RolloutError, match="--retry"):
        run_start(kube, settings=settings(**routing), **kw)
    with pytest.raises(RolloutError, match="nothing to promote"):
        rollout.promote(kube.kube(), settings(**routing), lambda v, r: None)


def test_resume_after_interruption_continues_from_recorded_step(kube: Emulator) -> None:
    calls: list[int] = []

    def flaky(cluster: Cluster, s: RolloutSettings) -> tuple[TrackMetrics, TrackMetrics]:
        calls.append(len(calls))
        if len(calls) == 2:
            raise ConnectionError("scrape interrupted")
        return metrics()(cluster, s)

    with pytest.raises(RolloutError, match=r"ConnectionError: scrape interrupted.*to resume"):
        run_start(kube, metrics=flaky)
    assert state(kube) == {"version": "7", "step": 1, "status": "progressing", "reason": ""}
    assert run_start(kube, metrics=flaky).status == "ready"
    assert len(calls) == 3  # step 0 was not analysed again
    with pytest.raises(RolloutError, match="version 7 is ready"):
        run_start(kube, version=8)


def test_resume_after_ctrl_c_while_waiting_for_the_canary(kube: Emulator) -> None:
    clock = Clock(Controller(kube))

    def sleep(seconds: float) -> None:
        if clock.t > 60:  # past step 0's soak: waiting for step 1's replicas
            raise KeyboardInterrupt
        clock.sleep(seconds)

    with pytest.raises(KeyboardInterrupt):
        rollout.start(kube.kube(), settings(), 7, metrics(), agree(0.99), clock=clock, sleep=sleep)
    assert state(kube) == {"version": "7", "step": 1, "status": "progressing", "reason": ""}
    assert kube.deployment("triton-canary")["spec"]["replicas"] == 2
    assert run_start(kube).status == "ready"


def test_retry_starts_an_aborted_version_again(kube: Emulator) -> None:
    with pytest.raises(RolloutAborted):
        run_start(kube, agreement=agree(0.5))
    assert run_start(kube, retry=True).status == "ready"
    assert state(kube)["reason"] == ""


def test_istio_steps_set_route_weights_and_promote_gives_stable_everything(
    kube: Emulator,
) -> None:
    seen: list[dict[str, int]] = []

    def analysed(cluster: Cluster, s: RolloutSettings) -> float:
        seen.append(weights(kube))
        return 0.99

    assert run_start(kube, settings=settings(**ISTIO), agreement=analysed).status == "ready"
    assert seen == [{"stable": 90, "canary": 10}, {"stable": 50, "canary": 50}]
    assert rollout.status(kube.kube(), settings(**ISTIO))["canaryWeight"] == 50
    before = len(kube.requests())
    rollout.promote(kube.kube(), settings(**ISTIO), lambda v, r: None)
    patched = [r.resource.plural for r in kube.requests()[before:] if r.method == "PATCH"]
    # Stable takes the version, then traffic leaves the canary before its pods do.
    assert patched == ["deployments", "virtualservices", "deployments"]
    assert weights(kube) == {"stable": 100, "canary": 0}
    assert kube.deployment("triton-canary")["spec"]["replicas"] == 0


def test_istio_without_the_virtual_service_names_the_fix(kube: Emulator) -> None:
    with pytest.raises(RolloutError, match=r"VirtualService 'other' not found.*overlays/istio"):
        run_start(kube, settings=settings(virtual_service="other"))
    with pytest.raises(RolloutError, match=r"subsets \['blue', 'stable'\]"):
        run_start(kube, settings=settings(**ISTIO, canary_subset="blue"))


def test_dry_run_prints_diff_and_changes_nothing(kube: Emulator) -> None:
    out = io.StringIO()
    run_start(kube, settings=settings(**ISTIO), dry_run=True, out=out)
    assert kube.get(DEPLOYMENTS, "triton-canary") is None and kube.writes() == 0
    text = out.getvalue()
    assert "+++ Deployment/triton-canary (planned)" in text
    assert "+          value: s3://drseg-models/triton/7" in text
    assert "--- VirtualService/triton (cluster)" in text and "+      weight: 10" in text

    run_start(kube)
    writes, out = kube.writes(), io.StringIO()
    rollout.promote(
        kube.kube(),
        settings(),
        lambda v, r: pytest.fail("dry run moved @champion"),
        dry_run=True,
        out=out,
    )
    assert kube.writes() == writes
    text = out.getvalue()
    assert "--- Deployment/triton (cluster)" in text
    assert "+          value: s3://drseg-models/triton/7" in text
    assert "-  replicas: 2\n+  replicas: 0" in text


def test_promote_keeps_the_canary_until_stable_is_ready(kube: Emulator) -> None:
    """Stable's new pods never get ready: the canary keeps serving, nothing is recorded as
    promoted and @champion does not move; once stable is healthy, promote completes."""
    assert run_start(kube).status == "ready"
    moved: list[str] = []
    broken = Clock(Controller(kube, failing=("triton",)))
    with pytest.raises(RolloutError, match="stable's update to version 7 is not ready"):
        rollout.promote(
            kube.kube(), settings(), lambda v, r: moved.append(v), clock=broken, sleep=broken.sleep
        )
    assert kube.deployment("triton-canary")["spec"]["replicas"] == 2
    assert state(kube)["status"] == "ready" and not moved
    healthy = Clock(Controller(kube))
    rollout.promote(
        kube.kube(), settings(), lambda v, r: moved.append(v), clock=healthy, sleep=healthy.sleep
    )
    assert kube.deployment("triton-canary")["spec"]["replicas"] == 0
    assert state(kube)["status"] == "promoted" and moved == ["7"]


def test_abort_is_idempotent_and_refuses_after_promote(kube: Emulator) -> None:
    assert rollout.abort(kube.kube(), settings()) is None  # no canary: nothing to do
    run_start(kube)
    aborted = rollout.abort(kube.kube(), settings(), "bad scans")
    assert aborted is not None and aborted.status == "aborted"
    assert rollout.status(kube.kube(), settings())["reason"] == "bad scans"
    rollout.abort(kube.kube(), settings(), "bad scans")
    assert kube.deployment("triton-canary")["spec"]["replicas"] == 0
    run_start(kube, version=8)
    rollout.promote(kube.kube(), settings(), lambda v, r: None)
    with pytest.raises(RolloutError, match="already promoted"):
        rollout.abort(kube.kube(), settings())


def test_service_selecting_track_is_refused(kube: Emulator) -> None:
    service = manifest(MANIFESTS / "base" / "triton-service.yaml", "Service")
    service["spec"]["selector"]["track"] = "stable"
    kube.put(SERVICES, service)
    with pytest.raises(RolloutError, match="no traffic"):
        run_start(kube)


def test_missing_stable_names_the_fix(kube: Emulator) -> None:
    with pytest.raises(RolloutError, match="Deployment 'blue' not found; apply the stable"):
        run_start(kube, settings=settings(stable="blue"))


SAMPLE = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="drseg",version="1"} 90
nv_inference_request_success{model="other",version="1"} 10
nv_inference_request_failure{model="drseg",reason="BACKEND",version="1"} 5
nv_inference_request_failure{model="drseg",reason="REJECTED",version="1"} 5
nv_inference_request_duration_us{model="drseg",version="1"} 2.5e6
nv_inference_request_summary_us{model="drseg",version="1",quantile="0.5"} 20000
nv_inference_request_summary_us{model="drseg",version="1",quantile="0.99"} 80000
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
"""


def test_parse_triton_metrics() -> None:
    m = rollout.parse_triton_metrics(SAMPLE)
    assert (m.success, m.failure, m.duration_us, m.p99_us) == (100, 10, 2.5e6, 80000)
    assert m.failure_rate == pytest.approx(10 / 110)
    assert m.latency_us == 80000
    no_summary = rollout.parse_triton_metrics(SAMPLE.replace("summary", "x"))
    assert no_summary.latency_us == 25000  # mean from the duration counter


def _pod(name: str, ip: str, phase: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"podIP": ip, "phase": phase}}


def test_scrape_metrics_sums_running_pods_per_track(kube: Emulator) -> None:
    run_start(kube)
    kube.put(PODS, _pod("triton-a", "10.0.0.1", "Running"))
    kube.put(PODS, _pod("triton-b", "10.0.0.2", "Pending"))
    urls: list[str] = []

    def fetch(url: str) -> str:
        urls.append(url)
        return SAMPLE

    stable, canary = rollout.scrape_metrics(kube.kube(), settings(), fetch)
    # kmock ignores the selector (both tracks get every pod): the selectors sent are checked.
    assert stable.success == canary.success == 100
    assert urls == ["http://10.0.0.1:8002/metrics"] * 2
    selectors = [r.params["labelSelector"] for r in kube.requests() if r.action == "LIST"]
    assert selectors == [
        "app.kubernetes.io/name=triton,track=stable,track!=canary",
        "app.kubernetes.io/name=triton,track=canary",
    ]


def test_probe_agreement_needs_photographs_and_a_pod_per_track(
    kube: Emulator, tmp_path: Path
) -> None:
    with pytest.raises(RolloutError, match=r"rollout\.probe_photos is not set"):
        rollout.probe_agreement(None, lambda v: pytest.fail("no contract"), "drseg")
    with pytest.raises(RolloutError, match=r"no photographs.*drseg synth"):
        rollout.probe_agreement(tmp_path, lambda v: pytest.fail("no contract"), "drseg")
    (tmp_path / "a.png").write_bytes(b"")
    agreement = rollout.probe_agreement(tmp_path, lambda v: pytest.fail("no contract"), "drseg")
    with pytest.raises(RolloutError, match=r"no running stable pod.*rollout\.stable_url"):
        agreement(kube.kube(), settings())


# --- least privilege -----------------------------------------------------------------------


def _granted(path: Path) -> set[tuple[str, str, str]]:
    role = manifest(path, "Role")
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def _every_path(kube: Emulator, **routing: str) -> set[tuple[str, str, str]]:
    """Walk every command path on `kube` and return the API calls they made."""
    s = settings(**routing)
    cluster = kube.kube()
    real_metrics = lambda c, st: rollout.scrape_metrics(c, st, lambda url: SAMPLE)  # noqa: E731
    with pytest.raises(RolloutAborted):
        run_start(kube, settings=s, metrics=real_metrics, agreement=agree(0.1))
    run_start(kube, settings=s, metrics=real_metrics, retry=True)
    rollout.status(cluster, s)
    rollout.promote(cluster, s, lambda v, r: None)
    run_start(kube, version=8, settings=s, metrics=real_metrics)
    rollout.abort(cluster, s, "operator")
    return kube.calls()


def test_roles_grant_exactly_the_calls_the_rollout_makes() -> None:
    """The calls are derived by running the rollout, not listed by hand: the base Role is
    what it needs with replica-ratio traffic, the Istio overlay's Role what Istio adds."""
    with triton_cluster() as plain:
        replicas = _every_path(plain)
    with triton_cluster() as meshed:
        istio = _every_path(meshed, **ISTIO)
    assert replicas == _granted(MANIFESTS / "base" / "rollout-role.yaml")
    assert istio - replicas == _granted(ISTIO_OVERLAY / "rollout-role-istio.yaml")
    assert not any(verb == "delete" for _, _, verb in istio)  # promote scales to 0 instead


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def kubeconfig(kube: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """`drseg rollout` finds the emulator through KUBECONFIG, as it would find a cluster."""
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("DRSEG_HOME", str(tmp_path / "home"))
    photos = tmp_path / "probes"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"")
    monkeypatch.setenv("DRSEG_ROLLOUT__PROBE_PHOTOS", str(photos))
    return kube


def exit_status(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`drseg ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_status_dry_run_and_abort(
    kubeconfig: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    kube = kubeconfig
    assert exit_status(["rollout", "status"], capsys)[:2] == (0, '{\n  "status": "none"\n}\n')
    code, out, _ = exit_status(["rollout", "start", "--version", "7", "--dry-run"], capsys)
    assert code == 0 and "+++ Deployment/triton-canary (planned)" in out
    assert kube.writes() == 0

    run_start(kube)
    code, out, _ = exit_status(["rollout", "abort", "--reason", "bad scans"], capsys)
    assert (code, out) == (0, "canary of version 7 aborted: bad scans\n")
    found = json.loads(exit_status(["rollout", "status"], capsys)[1])
    assert (found["status"], found["reason"], found["replicas"]) == ("aborted", "bad scans", 0)


def test_cli_exit_status_tells_an_abort_from_an_error(
    kubeconfig: Emulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exit 2 with the fix when the command cannot act; exit 1 when a check aborted the
    canary (here it never becomes ready: no controller runs)."""
    code, _, err = exit_status(["rollout", "promote"], capsys)
    assert code == 2 and "error: nothing to promote: no rollout" in err
    monkeypatch.delenv("DRSEG_ROLLOUT__PROBE_PHOTOS")
    code, _, err = exit_status(["rollout", "start", "--version", "7"], capsys)
    assert code == 2 and "rollout.probe_photos is not set" in err

    monkeypatch.setenv("DRSEG_ROLLOUT__PROBE_PHOTOS", str(tmp_path / "missing"))
    code, _, err = exit_status(["rollout", "start", "--version", "7"], capsys)
    assert code == 2 and f"rollout.probe_photos: {tmp_path / 'missing'}: no photographs" in err

    monkeypatch.setenv("DRSEG_ROLLOUT__PROBE_PHOTOS", str(tmp_path / "probes"))
    monkeypatch.setenv("DRSEG_ROLLOUT__READY_TIMEOUT_S", "0.2")
    monkeypatch.setenv("DRSEG_ROLLOUT__POLL_S", "0.05")
    code, _, err = exit_status(["rollout", "start", "--version", "7"], capsys)
    assert code == 1
    assert "aborted: canary of version 7 aborted at step 0: triton-canary not ready" in err
    assert state(kubeconfig)["status"] == "aborted"


def test_settings_show_the_rollout_section(capsys: pytest.CaptureFixture[str]) -> None:
    main(["config", "show"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["rollout"]["steps"] == [0.1, 0.5]
    assert shown["rollout"]["virtual_service"] is None


def test_steps_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing shares"):
        RolloutSettings(steps=(0.5, 0.1))
