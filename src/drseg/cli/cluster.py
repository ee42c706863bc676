"""Cluster verbs: the pipeline on Kubeflow Pipelines and the canary rollout."""

from __future__ import annotations

from pathlib import Path

from drseg import cluster
from drseg import rollout as rollout_commands
from drseg.cli.verb import Verbs, add_verb


def add_verbs(verbs: Verbs) -> None:
    pipeline = add_verb(
        verbs, "pipeline", lambda *_: pipeline.print_help(), "the pipeline on Kubeflow Pipelines"
    )
    pipeline_verbs = pipeline.add_subparsers(dest="pipeline_verb", metavar="ACTION")
    compile_ = pipeline_verbs.add_parser("compile", help="write the compiled pipeline YAML")
    compile_.set_defaults(handler=cluster.compile_command)
    compile_.add_argument(
        "--out", type=Path, default=cluster.COMPILED, help="output file (default: %(default)s)"
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

    rollout = add_verb(
        verbs,
        "rollout",
        lambda *_: rollout.print_help(),
        "canary rollout of a model version on Kubernetes (settings: rollout.*)",
    )
    rollout.epilog = (
        "Every action can be re-run after an interruption: the rollout's state is recorded on "
        "the canary Deployment. Exit status 1: a check failed and the canary was aborted "
        "(stable untouched); 2: the action could not run."
    )
    rollout_verbs = rollout.add_subparsers(dest="rollout_verb", metavar="ACTION")
    rollout_start = rollout_verbs.add_parser(
        "start",
        help="create the canary and walk the traffic steps, checking it against stable at each",
        description="Create or update the canary Deployment of VERSION beside stable and walk "
        "rollout.steps: at each, wait until it is ready, shift traffic to it (replica ratio, or "
        "Istio weights with rollout.virtual_service), let it soak, then compare it with stable "
        "(failure rate, p99 latency, Dice agreement of the masks on rollout.probe_photos). Any "
        "failed check aborts the canary.",
    )
    rollout_start.set_defaults(handler=rollout_commands.start_command)
    rollout_start.add_argument(
        "--version", type=int, required=True, help="registry version to roll out"
    )
    rollout_start.add_argument(
        "--retry", action="store_true", help="start an aborted version again from the first step"
    )
    rollout_status = rollout_verbs.add_parser(
        "status", help="print the recorded rollout state as JSON"
    )
    rollout_status.set_defaults(handler=rollout_commands.status_command)
    rollout_promote = rollout_verbs.add_parser(
        "promote", help="stable takes the canary's version; @champion moves, @previous is kept"
    )
    rollout_promote.set_defaults(handler=rollout_commands.promote_command)
    rollout_abort = rollout_verbs.add_parser(
        "abort", help="send all traffic to stable and scale the canary to 0"
    )
    rollout_abort.set_defaults(handler=rollout_commands.abort_command)
    rollout_abort.add_argument(
        "--reason", default="aborted by operator", help="recorded on the canary"
    )
    for action in (rollout_start, rollout_promote, rollout_abort):
        action.add_argument(
            "--dry-run", action="store_true", help="print the planned changes as a diff only"
        )
