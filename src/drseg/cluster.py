"""`drseg pipeline`: the training pipeline on a Kubeflow Pipelines cluster.

compile writes the YAML a cluster runs (checked in, so a review sees what changes on the
cluster); submit starts one run; schedule starts a recurring run. Cluster placement (GPU
nodes, /dev/shm, Secrets) comes from `ClusterSettings`; the pipeline's parameters come from
the same settings `drseg run` uses (drseg.pipeline).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drseg import pipeline
from drseg.config import ClusterSettings, Settings
from drseg.errors import UserError

if TYPE_CHECKING:
    pass


class ClusterError(UserError, ValueError):
    """submit/schedule cannot go ahead as asked; the message names the setting and the fix."""


# --- recurring runs: KFP's cron -----------------------------------------------------------

_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("seconds", 0, 59, ()),
    ("minutes", 0, 59, ()),
    ("hours", 0, 23, ()),
    ("day of month", 1, 31, ()),
    (
        "month",
        1,
        12,
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
    ),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
_CRON_DESCRIPTORS = (
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
)
_EVERY = re.compile(r"^@every\s+(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(text: str, low: int, high: int, names: tuple[str, ...]) -> int | None:
    if text.upper() in names:
        return names.index(text.upper()) + low
    if text.isdigit() and low <= int(text) <= high:
        return int(text)
    return None


def _check_cron_field(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> None:
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            raise ClusterError(f"cron {name} field {text!r}: the step after '/' must be > 0")
        if span in ("*", "?"):
            continue
        ends = span.split("-")
        values = [_cron_value(end, low, high, names) for end in ends]
        if len(ends) > 2 or None in values:
            raise ClusterError(
                f"cron {name} field {text!r}: expected *, ?, a value {low}-{high}"
                + (f" or {names[0]}-{names[-1]}" if names else "")
                + ", a range a-b, a list a,b or a step */n"
            )


def validate_cron(expression: str) -> str:
    """A KFP cron expression (six fields, seconds first), or ClusterError saying the fix.

    KFP's scheduler (robfig/cron with seconds) reads a five-field Unix cron one field off:
    refusing it beats a schedule that silently fires at the wrong times.
    """
    text = " ".join(expression.split())
    if text.startswith("@"):
        if text in _CRON_DESCRIPTORS or _EVERY.match(text):
            return text
        raise ClusterError(
            f"cron {expression!r}: unknown descriptor; use one of {', '.join(_CRON_DESCRIPTORS)} "
            "or '@every 6h'"
        )
    fields = text.split(" ")
    if len(fields) == 5:
        raise ClusterError(
            f"cron {expression!r} has five fields, but KFP cron has six, seconds first "
            f"(seconds minutes hours day-of-month month day-of-week); for the same schedule "
            f"pass --cron '0 {text}'"
        )
    if len(fields) != 6:
        raise ClusterError(
            f"cron {expression!r} has {len(fields)} fields; KFP cron has six, seconds first, "
            "e.g. '0 0 3 * * *' for every day at 03:00"
        )
    for field, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(field, name, low, high, names)
    return text


# --- talking to a KFP endpoint ------------------------------------------------------------

ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "PAUSED", "CANCELING"})
"""KFP run states that still hold (or will hold) the GPU nodes."""


def _credentials(cluster: ClusterSettings) -> Any:
    """kfp.Client credentials for cluster.kfp_auth; None: the request goes without."""
    if cluster.kfp_auth == "none":
        return None
    from kfp.client import (
        KF_PIPELINES_SA_TOKEN_ENV,
        KF_PIPELINES_SA_TOKEN_PATH,
        ServiceAccountTokenVolumeCredentials,
    )

    path = Path(os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH)
    if not path.is_file():
        raise ClusterError(
            f"{path}: no service-account token to authenticate to KFP with (cluster.kfp_auth = "
            f"{cluster.kfp_auth}); mount a projected token with audience "
            f"pipelines.kubeflow.org there (manifests/pipelines/nightly-cronjob.yaml) or set "
            f"{KF_PIPELINES_SA_TOKEN_ENV} to its path"
        )
    # Re-read on every request: the kubelet rotates a projected token before it expires.
    return ServiceAccountTokenVolumeCredentials(path=str(path))


def _client(cluster: ClusterSettings) -> Any:
    import kfp

    if not cluster.kfp_host:
        raise ClusterError(
            "cluster.kfp_host is not set: set it in the settings file or with "
            "DRSEG_CLUSTER__KFP_HOST=https://<kubeflow>/pipeline"
        )
    return kfp.Client(
        host=cluster.kfp_host, namespace=cluster.namespace, credentials=_credentials(cluster)
    )


def active_run(client: Any, cluster: ClusterSettings) -> tuple[str, str] | None:
    """(run id, state) of a run of cluster.experiment that has not finished, if any."""
    experiment = client.create_experiment(cluster.experiment, namespace=cluster.namespace)
    page = client.list_runs(
        experiment_id=experiment.experiment_id,
        namespace=cluster.namespace,
        page_size=100,
        sort_by="created_at desc",
    )
    for run in page.runs or []:
        if run.state in ACTIVE_STATES:
            return str(run.run_id), str(run.state)
    return None


def submit(
    settings: Settings,
    source: str,
    pool: str | None,
    run_name: str | None = None,
    cluster: ClusterSettings | None = None,
    unless_running: bool = False,
) -> str | None:
    """Start one run on the cluster (`cluster` or the settings' section); returns its id.

    With `unless_running`, a run of the experiment that has not finished yet means no new
    one (None is returned): what keeps a cron that only submits from stacking multi-hour
    runs on the same GPUs.
    """
    from drseg.pipeline import pipeline_arguments

    cluster = cluster or settings.cluster
    arguments = pipeline_arguments(settings, source, pool)
    client = _client(cluster)
    if unless_running and active_run(client, cluster) is not None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        package = pipeline.compile_pipeline(
            Path(folder) / "training.yaml", cluster, settings.pretrain.include_labelled
        )
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=cluster.experiment,
            namespace=cluster.namespace,
        )
    return str(result.run_id)


def schedule(
    settings: Settings,
    source: str,
    pool: str | None,
    cron: str,
    name: str = "drseg-retraining",
    cluster: ClusterSettings | None = None,
    catchup: bool = False,
) -> str:
    """Create a recurring run on the cluster; returns its id. The cron is checked first, so
    a wrong schedule never reaches the cluster.

    At most one of its runs at a time: a retraining that overruns its period must not start
    a second one on the same GPUs. No catch-up by default: after the schedule was paused or
    KFP was down, one run starts at the next tick, not one per missed tick.
    """
    from drseg.pipeline import pipeline_arguments

    cron = validate_cron(cron)
    cluster = cluster or settings.cluster
    arguments = pipeline_arguments(settings, source, pool)
    client = _client(cluster)
    experiment = client.create_experiment(cluster.experiment, namespace=cluster.namespace)
    with tempfile.TemporaryDirectory() as folder:
        package = pipeline.compile_pipeline(
            Path(folder) / "training.yaml", cluster, settings.pretrain.include_labelled
        )
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=name,
            cron_expression=cron,
            pipeline_package_path=str(package),
            params=arguments,
            max_concurrency=1,
            no_catchup=not catchup,
        )
    return str(job.recurring_run_id)


# --- CLI handlers (wired in drseg.cli) ------------------------------------------------------


def compile_command(args: argparse.Namespace, settings: Settings) -> None:
    out = pipeline.compile_pipeline(args.out, settings.cluster, settings.pretrain.include_labelled)
    print(f"compiled the training pipeline to {out}")


def submit_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.run import RunError

    try:
        run_id = submit(
            settings, args.source, args.pool, args.name, unless_running=args.unless_running
        )
    except RunError as exc:
        raise UserError(str(exc)) from exc
    host = settings.cluster.kfp_host
    if run_id is None:
        print(
            f"no run started: a run of experiment {settings.cluster.experiment!r} on {host} "
            "has not finished yet"
        )
    else:
        print(f"run {run_id} started on {host}")


def schedule_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.run import RunError

    try:
        job_id = schedule(
            settings, args.source, args.pool, args.cron, args.name, catchup=args.catchup
        )
    except RunError as exc:
        raise UserError(str(exc)) from exc
    print(f"recurring run {job_id} ({args.name}) on cron {args.cron!r}")
