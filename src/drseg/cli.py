"""`drseg <verb>`: one verb per pipeline step, plus `run` for the whole pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from drseg import cluster
from drseg import rollout as rollout_commands
from drseg.config import Settings, SettingsError, load_settings, settings_as_yaml

EPILOG = """\
settings: defaults < YAML file (--config or DRSEG_CONFIG) < DRSEG_<SECTION>__<FIELD> variables,
e.g. DRSEG_INGEST__WORKING_WIDTH=2048. `drseg config show` prints the effective settings.
"""


def _synth(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.synthetic import write_synthetic_dataset

    synth = settings.synth
    ids = write_synthetic_dataset(
        args.out,
        args.n or synth.n,
        synth.seed if args.seed is None else args.seed,
        args.width or synth.width,
        args.layout or synth.layout,
    )
    print(f"wrote {len(ids)} synthetic photographs with masks to {args.out}")


def _ingest(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.ingest import format_summary, ingest

    overrides = {k: v for k, v in (("layout", args.layout), ("working_width", args.width)) if v}
    ingest_settings = settings.ingest.model_copy(update=overrides)
    result = ingest(args.source, args.out, ingest_settings, settings.storage)
    print(format_summary(result.summary))
    for problem in result.quarantined:
        print(f"quarantined {problem.path}: {problem.problem} -> {problem.fix}", file=sys.stderr)
    print(f"dataset written to {args.out}")


def _clahe(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.enhance import clahe_dataset

    manifest = clahe_dataset(args.dataset, args.out, settings.clahe)
    print(f"{len(manifest.records)} photographs -> {args.out} (hash {manifest.dataset_hash[:16]})")


def _pipeline_run_id() -> str:
    """Outside a pipeline, each command is its own "pipeline run" in MLflow."""
    import secrets

    return f"cli-{secrets.token_hex(4)}"


def _pretrain(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import pretrain_step

    figures = pretrain_step(
        args.pool,
        args.labelled,
        args.out,
        settings.model,
        # Naming a labelled folder is asking for it (pretrain.include_labelled).
        settings.pretrain.model_copy(
            update={"enabled": True, "include_labelled": args.labelled is not None}
        ),
        settings.tracking,
        settings.home,
        _pipeline_run_id(),
    )
    print(
        f"{figures['steps']} steps, final loss {figures['final_loss']:.4f}, "
        f"{figures['images_per_second']:.1f} views/s; encoder in {figures['encoder']}"
    )


def _finetune(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import finetune_step, pretrained_encoder

    figures = finetune_step(
        args.dataset,
        args.out,
        settings.model,
        settings.finetune,
        settings.tracking,
        settings.home,
        _pipeline_run_id(),
        None if args.encoder is None else pretrained_encoder(args.encoder),
    )
    print(
        f"{figures['steps']} steps, final loss {figures['final_loss']:.4f}, "
        f"{figures['images_per_second']:.1f} img/s; model in {args.out}"
    )


def _evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import evaluate_step

    outcome = evaluate_step(
        args.model,
        args.dataset,
        args.out,
        settings.evaluate,
        settings.tracking,
        settings.home,
        _pipeline_run_id(),
        split=args.split,
    )
    print(outcome.report.read_text())
    print(f"metrics, plots and overlays in {args.out}")


def _run(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.run import RunError, format_run_summary, run_pipeline

    try:
        run = run_pipeline(settings, args.source, args.pool, verbose=args.verbose)
    except RunError as exc:
        raise SystemExit(f"drseg run: {exc}") from exc
    summary = json.loads((run / "summary.json").read_text())
    print(format_run_summary(summary, run))
    if summary["status"] == "failed":
        raise SystemExit(1)


def _registry(args: argparse.Namespace, settings: Settings) -> None:
    from drseg import registry
    from drseg.tracking import tracking_uri

    uri = tracking_uri(settings.tracking, settings.home)
    name = settings.registry.model_name
    if args.action == "promote":
        if args.version is None:
            raise SystemExit("drseg registry promote: give the VERSION to promote")
        registry.promote(uri, name, args.version, reason=args.reason)
        print(f"{name}: version {args.version} is @champion")
    elif args.action == "rollback":
        version = registry.rollback(uri, name, reason=args.reason)
        print(f"{name}: rolled back, version {version} is @champion")
    else:
        print(registry.show(uri, name))


def _repository(args: argparse.Namespace, settings: Settings) -> Path:
    from drseg.run import RunError, latest_repository

    if args.repository is not None:
        return Path(args.repository)
    try:
        return latest_repository(settings.home)
    except RunError as exc:
        raise SystemExit(f"drseg {args.verb}: {exc}") from exc


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.serving.server import serve

    serve(_repository(args, settings), settings.serve, args.version)


def _predict(args: argparse.Namespace, settings: Settings) -> None:
    from tritonclient.utils import InferenceServerException

    from drseg.serving.client import predict
    from drseg.serving.server import resolve_model

    serve = settings.serve
    port = serve.grpc_port if args.protocol == "grpc" else serve.http_port
    try:
        model = resolve_model(_repository(args, settings), serve.model_name, args.version)
        results = predict(
            args.photos,
            args.server or f"{serve.host}:{port}",
            args.protocol,
            args.out,
            model.onnx_path,
            serve.model_name,
        )
    except (ValueError, FileNotFoundError, InferenceServerException) as exc:
        # A bad photograph or an unreachable server: the message names it and the fix.
        raise SystemExit(f"drseg predict: error: {exc}") from exc
    for result in results:
        found = ", ".join(f"{cls} {info['components']}" for cls, info in result.classes.items())
        seconds = result.total_seconds
        print(f"{result.photograph}: {found} lesions ({seconds:.1f} s) -> {result.folder}")


def _config_show(args: argparse.Namespace, settings: Settings) -> None:
    print(settings_as_yaml(settings), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drseg",
        description="Retraining pipeline for diabetic-retinopathy lesion segmentation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML settings file")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, handler: Callable[..., None], help_text: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    run = verb("run", _run, "run the whole pipeline locally (kfp.local); synthetic data by default")
    run.add_argument(
        "--source", help="folder or s3:// prefix to train on instead of synthetic data"
    )
    run.add_argument(
        "--pool", help="folder or s3:// prefix of unlabelled photographs to pretrain on"
    )
    run.add_argument("--verbose", action="store_true", help="stream every task's log")

    synth = verb("synth", _synth, "generate synthetic fundus photographs with exact masks")
    synth.add_argument("--n", type=int, help="number of photographs (default: synth.n)")
    synth.add_argument("--seed", type=int, help="random seed (default: synth.seed)")
    synth.add_argument("--width", type=int, help="image width in pixels (default: synth.width)")
    synth.add_argument("--layout", choices=["idrid", "generic"], help="folder layout to write")
    synth.add_argument("--out", type=Path, required=True, help="output folder")

    ingest = verb("ingest", _ingest, "validate, resize and split a source into a dataset")
    ingest.add_argument("--source", required=True, help="folder or s3://bucket/prefix")
    ingest.add_argument("--out", type=Path, required=True, help="new dataset folder")
    ingest.add_argument(
        "--layout", choices=["auto", "idrid", "generic", "unlabelled"], help="source layout"
    )
    ingest.add_argument("--width", type=int, help="working width (default: ingest.working_width)")

    clahe = verb("clahe", _clahe, "CLAHE inside the field of view of every photograph")
    clahe.add_argument("--dataset", type=Path, required=True, help="dataset folder (from ingest)")
    clahe.add_argument("--out", type=Path, required=True, help="new dataset folder")

    pretrain = verb("pretrain", _pretrain, "SimCLR pretraining of the encoder on photographs")
    pretrain.add_argument(
        "--pool", type=Path, nargs="+", required=True, help="dataset folder(s) (clahe), unlabelled"
    )
    pretrain.add_argument(
        "--labelled",
        type=Path,
        help="labelled dataset folder (clahe) whose train split joins the pool, without labels",
    )
    pretrain.add_argument("--out", type=Path, required=True, help="output folder; rerun to resume")

    finetune = verb("finetune", _finetune, "train the multi-task U-Net on a dataset's train split")
    finetune.add_argument("--dataset", type=Path, required=True, help="dataset folder (clahe)")
    finetune.add_argument(
        "--out", type=Path, required=True, help="model folder; rerun to resume from it"
    )
    finetune.add_argument(
        "--encoder", type=Path, help="pretrain output folder to start from (default: random)"
    )

    evaluate = verb("evaluate", _evaluate, "tiled inference, metrics and plots on a split")
    evaluate.add_argument("--model", type=Path, required=True, help="model folder (finetune)")
    evaluate.add_argument("--dataset", type=Path, required=True, help="dataset folder (clahe)")
    evaluate.add_argument("--out", type=Path, required=True, help="output folder")
    evaluate.add_argument("--split", choices=["val", "train"], default="val")

    registry = verb("registry", _registry, "MLflow registry: versions, aliases and their history")
    registry.add_argument(
        "action", choices=["show", "promote", "rollback"], nargs="?", default="show"
    )
    registry.add_argument("version", nargs="?", help="version to promote to @champion")
    registry.add_argument("--reason", help="recorded with the alias move")

    serve = verb("serve", _serve, "serve a Triton model repository on 127.0.0.1 (Ctrl-C stops)")
    serve.add_argument(
        "--repository", type=Path, help="Triton model repository (default: the newest run's)"
    )
    serve.add_argument("--version", type=int, help="model version (default: the newest)")

    predict = verb("predict", _predict, "segment photographs on a running Triton server")
    predict.add_argument("photos", type=Path, nargs="+", help="photographs (JPEG, PNG, TIFF)")
    predict.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    predict.add_argument("--server", help="host:port (default: serve.host and its port)")
    predict.add_argument("--protocol", choices=["http", "grpc"], default="http")
    predict.add_argument(
        "--repository",
        type=Path,
        help="the served repository (its model.onnx holds the "
        "preprocessing contract; default: the newest run's)",
    )
    predict.add_argument("--version", type=int, help="model version (default: the newest)")

    pipeline = verb(
        "pipeline", lambda *_: pipeline.print_help(), "the pipeline on Kubeflow Pipelines"
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
    schedule = pipeline_verbs.add_parser("schedule", help="recurring run on cluster.kfp_host")
    schedule.set_defaults(handler=cluster.schedule_command)
    schedule.add_argument(
        "--cron", required=True, help="KFP cron, six fields, seconds first: '0 0 3 * * *'"
    )
    schedule.add_argument("--source", required=True, help="s3:// prefix to train on")
    schedule.add_argument("--pool", help="s3:// prefix of unlabelled photographs to pretrain on")
    schedule.add_argument("--name", default="drseg-retraining", help="recurring run name")

    rollout = verb(
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

    config = verb("config", lambda *_: config.print_help(), "settings")
    config_verbs = config.add_subparsers(dest="config_verb", metavar="ACTION")
    show = config_verbs.add_parser("show", help="print the effective settings (secrets masked)")
    show.set_defaults(handler=_config_show)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from drseg.data.dataset import DatasetError
    from drseg.data.ingest import IngestError
    from drseg.data.storage import StorageError

    try:
        settings = load_settings(args.config)
        args.handler(args, settings)
    except (SettingsError, IngestError, StorageError, DatasetError, FileExistsError) as exc:
        print(f"drseg {args.verb}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
