"""Cluster verbs: the pipeline on Kubeflow Pipelines, and the way from a registered version
to a promoted canary (publish, rollout, probe). The rollout handlers live here; the logic
is drseg.cluster and drseg.deploy."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from drseg import cluster
from drseg.cli.verb import Verbs, add_verb
from drseg.config import Settings
from drseg.errors import UserError
from drseg.pipeline import COMPILED


def add_verbs(verbs: Verbs) -> None:
    _pipeline_verbs(verbs)
    _deploy_verbs(verbs)


def _pipeline_verbs(verbs: Verbs) -> None:
    pipeline = add_verb(
        verbs, "pipeline", lambda *_: pipeline.print_help(), "the pipeline on Kubeflow Pipelines"
    )
    pipeline_verbs = pipeline.add_subparsers(dest="pipeline_verb", metavar="ACTION")
    compile_ = pipeline_verbs.add_parser("compile", help="write the compiled pipeline YAML")
    compile_.set_defaults(handler=cluster.compile_command)
    compile_.add_argument(
        "--out", type=Path, default=COMPILED, help="output file (default: %(default)s)"
    )
    submit = pipeline_verbs.add_parser("submit", help="start one run on cluster.kfp_host")
    submit.set_defaults(handler=cluster.submit_command)
    submit.add_argument("--source", required=True, help="s3:// prefix to train on")
    submit.add_argument("--pool", help="s3:// prefix of unlabelled photographs to pretrain on")
    submit.add_argument("--name", help="run name (default: the pipeline's name and the time)")
    submit.add_argument(
        "--unless-running",
        action="store_true",
        help="start nothing while a run of cluster.experiment has not finished (for a cron "
        "that only submits: runs take hours)",
    )
    schedule = pipeline_verbs.add_parser("schedule", help="recurring run on cluster.kfp_host")
    schedule.set_defaults(handler=cluster.schedule_command)
    schedule.add_argument(
        "--cron", required=True, help="KFP cron, six fields, seconds first: '0 0 3 * * *'"
    )
    schedule.add_argument("--source", required=True, help="s3:// prefix to train on")
    schedule.add_argument("--pool", help="s3:// prefix of unlabelled photographs to pretrain on")
    schedule.add_argument("--name", default="drseg-retraining", help="recurring run name")
    schedule.add_argument(
        "--catchup",
        action="store_true",
        help="after a pause or an outage, start one run per missed period (default: one run "
        "at the next period); never more than one run at a time either way",
    )


def _deploy_verbs(verbs: Verbs) -> None:
    publish = add_verb(
        verbs,
        "publish",
        publish_command,
        "copy a version's Triton repository to rollout.repository_uri (staged, then marked)",
    )
    publish.add_argument("--version", type=int, required=True, help="registry version")
    publish.add_argument(
        "--repository", type=Path, help="local Triton repository (default: the last run's)"
    )

    probe = add_verb(
        verbs,
        "probe",
        probe_command,
        "check the canary against its registered graph and against stable on the probe set",
    )
    probe.epilog = "Exit status 0: pass; 1: the canary fails (reason on one line); 2: no verdict."
    # A string: the analysis passes "{{args.version}}", which Argo fills in.
    probe.add_argument("--version", required=True, help="the version the canary must serve")
    probe.add_argument("--canary", help="canary host:port (default: rollout.canary_url)")
    probe.add_argument("--stable", help="stable host:port (default: rollout.stable_url)")

    rollout = add_verb(
        verbs,
        "rollout",
        lambda *_: rollout.print_help(),
        "the Argo Rollouts canary of a model version (settings: rollout.*)",
    )
    rollout.epilog = (
        "Each action does what `kubectl argo rollouts` would; the steps, traffic and analysis "
        "are Argo's (manifests/base). Exit status 1: the canary was aborted; 2: the action "
        "could not run."
    )
    actions = rollout.add_subparsers(dest="rollout_verb", metavar="ACTION")
    start = actions.add_parser(
        "start", help="set VERSION on the Rollout's template; Argo starts the canary"
    )
    start.set_defaults(handler=rollout_start_command)
    start.add_argument("--version", type=int, required=True, help="published registry version")
    start.add_argument("--retry", action="store_true", help="restart an aborted canary")
    actions.add_parser(
        "status", help="the Rollout, its analysis and any drift from MLflow @champion (JSON)"
    ).set_defaults(handler=rollout_status_command)
    promote = actions.add_parser(
        "promote", help="past the current pause or step; @champion moves once stable"
    )
    promote.set_defaults(handler=rollout_promote_command)
    promote.add_argument("--full", action="store_true", help="skip every remaining step")
    actions.add_parser("abort", help="all traffic back to stable").set_defaults(
        handler=rollout_abort_command
    )


@contextlib.contextmanager
def _kubernetes_errors() -> Iterator[None]:
    """A refusal of the Kubernetes API as a user error that names the likely fix."""
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        raise UserError(
            f"Kubernetes API answered {exc.status} {exc.reason}; check rollout.namespace and "
            "that the drseg-rollout Role is applied (manifests/base)"
        ) from exc


def publish_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.deploy.publish import publish
    from drseg.run import latest_repository

    repository = args.repository or latest_repository(settings.home)
    published = publish(
        repository,
        settings.serve.model_name,
        args.version,
        settings.rollout.repository_uri,
        settings.storage,
    )
    state = "already published" if published.already else "published"
    print(f"{state} version {args.version}: {len(published.files)} files at {published.uri}")


def _graphs(settings: Settings, folder: Path) -> Callable[[str], Path]:
    """A version's registered model.onnx, downloaded once per version."""
    from drseg import registry
    from drseg.tracking import tracking_uri

    uri = tracking_uri(settings.tracking, settings.home)

    @functools.cache
    def graph(version: str) -> Path:
        return registry.download_onnx(uri, settings.registry.model_name, version, folder / version)

    return graph


def probe_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.storage import download_tree, is_remote
    from drseg.deploy.probe import ProbeError, load_probe_set, probe

    overrides = {"canary_url": args.canary, "stable_url": args.stable}
    rollout = settings.rollout.model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    with tempfile.TemporaryDirectory(prefix="drseg-probe-") as tmp:
        if not args.version.isdigit():
            raise ProbeError(f"--version {args.version!r}: pass a registry version number")
        if rollout.probe_set is None:
            raise ProbeError(
                "rollout.probe_set is not set: point it (DRSEG_ROLLOUT__PROBE_SET) at a "
                "labelled dataset written by `drseg ingest`, a folder or s3:// prefix"
            )
        root = Path(rollout.probe_set)
        if is_remote(rollout.probe_set):
            root = Path(tmp) / "probe-set"
            download_tree(rollout.probe_set, root, settings.storage)
        cases = load_probe_set(root)
        verdict = probe(
            cases,
            args.version,
            _graphs(settings, Path(tmp) / "graphs"),
            rollout,
            settings.serve.model_name,
        )
    if not verdict.passed:
        print(f"drseg probe: fail: {verdict.reason}", file=sys.stderr)
        raise SystemExit(1)
    print(f"drseg probe: pass: {verdict.reason}")


def rollout_start_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.storage import open_storage
    from drseg.deploy import argo
    from drseg.deploy.kube import KubeRollouts, RolloutError
    from drseg.deploy.publish import published_files, repository_uri

    with _kubernetes_errors():
        uri = repository_uri(settings.rollout.repository_uri, args.version)
        if published_files(open_storage(uri, settings.storage)) is None:
            raise RolloutError(
                f"version {args.version} is not published at {uri}: run "
                f"`drseg publish --version {args.version}` first"
            )
        kube = KubeRollouts.from_environment(settings.rollout.namespace)
        argo.set_version(kube, settings.rollout, args.version, uri, retry=args.retry)
    print(
        f"Rollout {settings.rollout.name}: template set to version {args.version}; Argo runs "
        f"the canary steps (`drseg rollout status` or `kubectl argo rollouts get rollout "
        f"{settings.rollout.name} --watch`)"
    )


def _champion_uri(settings: Settings) -> tuple[str, str]:
    from drseg.tracking import tracking_uri

    return tracking_uri(settings.tracking, settings.home), settings.registry.model_name


def rollout_status_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.deploy import argo
    from drseg.deploy.champion import ChampionLink, champion_version
    from drseg.deploy.kube import KubeRollouts

    with _kubernetes_errors():
        kube = KubeRollouts.from_environment(settings.rollout.namespace)
        status = argo.read_status(kube, settings.rollout)
        link = ChampionLink(champion_version(*_champion_uri(settings)), status.stable_version)
    print(json.dumps({**asdict(status), "champion": link.champion, "drift": link.drift}, indent=2))


def rollout_promote_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.deploy import argo
    from drseg.deploy.champion import follow
    from drseg.deploy.kube import KubeRollouts

    with _kubernetes_errors():
        kube = KubeRollouts.from_environment(settings.rollout.namespace)
        wait = False
        if not argo.read_status(kube, settings.rollout).promoted:
            promoted = argo.promote(kube, settings.rollout, full=args.full)
            wait = args.full or not argo.pauses_ahead(promoted)
        # Past the last pause Argo finishes on its own: wait for it (bounded), then move
        # @champion; before it, the next pause needs another promote.
        deadline = time.monotonic() + (settings.rollout.promote_timeout_s if wait else 0)
        status = argo.read_status(kube, settings.rollout)
        while not (status.promoted or status.aborted) and time.monotonic() < deadline:
            time.sleep(settings.rollout.poll_s)
            status = argo.read_status(kube, settings.rollout)
        if status.aborted:
            print(f"drseg rollout promote: aborted: {status.message}", file=sys.stderr)
            raise SystemExit(1)
        link = follow(*_champion_uri(settings), status)
    if status.promoted:
        print(f"version {status.stable_version} is stable and @champion ({link.champion})")
    else:
        print(
            f"Rollout {settings.rollout.name} at step {status.step}/{status.steps} "
            f"({status.phase}: {status.message or 'no message'}); @champion stays at "
            f"{link.champion}: promote again at the next pause"
        )


def rollout_abort_command(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.deploy import argo
    from drseg.deploy.kube import KubeRollouts

    with _kubernetes_errors():
        kube = KubeRollouts.from_environment(settings.rollout.namespace)
        argo.abort(kube, settings.rollout)
    print(f"Rollout {settings.rollout.name}: aborted; all traffic back on stable")
