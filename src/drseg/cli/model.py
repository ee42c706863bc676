"""Model verbs: every step from the trained model to the Triton repository, by hand, through
the same step code the pipeline runs (drseg.steps), and the MLflow registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from drseg.cli.verb import Verbs, add_verb, pipeline_run_id
from drseg.config import Settings
from drseg.errors import UserError


def _export(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import export_step

    summary = export_step(
        args.model, args.dataset, args.out, settings.export, settings.ingest, settings.clahe
    )
    print(
        f"{summary['onnx']}: {summary['size_bytes'] / 1e6:.1f} MB, parity max abs diff "
        f"{summary['parity_max_abs_diff']:.2g}; thresholds untuned until `drseg evaluate`"
    )


def _evaluate(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import evaluate_step

    outcome = evaluate_step(
        args.onnx,
        args.dataset,
        args.out,
        args.served,
        settings.evaluate,
        settings.registry,
        settings.tracking,
        settings.home,
        pipeline_run_id(),
        split=args.split,
    )
    print(outcome.report.read_text())
    print(f"metrics, plots and overlays in {args.out}; the served graph in {args.served}")


GATE_PASSED, GATE_FAILED, GATE_CANNOT_ACT = 0, 1, 2
"""`drseg gate` exit statuses."""


def _gate(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.evaluate.schema import Metrics
    from drseg.steps import gate_step

    try:
        metrics = Metrics.read(args.metrics)
        champion = None if args.champion_metrics is None else Metrics.read(args.champion_metrics)
        outcome = gate_step(
            metrics,
            champion,
            "no --champion-metrics given",
            settings.gate,
            settings.tracking,
            settings.home,
            pipeline_run_id(),
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"drseg gate: cannot decide: {exc}", file=sys.stderr)
        raise SystemExit(GATE_CANNOT_ACT) from exc
    print(outcome.markdown)
    if args.verdict:
        args.verdict.write_text(outcome.verdict_json)
    raise SystemExit(GATE_PASSED if outcome.passed else GATE_FAILED)


def _register(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import register_step

    registered = register_step(
        args.served,
        args.model,
        args.evaluation,
        args.verdict.read_text(),
        settings.registry,
        settings.tracking,
        settings.home,
        pipeline_run_id(),
    )
    print(f"registered {registered['model_name']} version {registered['version']} @challenger")


def _tensorrt(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import engine_step

    built = engine_step(args.served, args.dataset, args.out, settings.export)
    print(json.dumps(built, indent=2))


def _repository(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import repository_step

    written = repository_step(args.served, args.engine, args.version, args.out, settings.serve)
    print(
        f"{written['model_name']} version {written['version']} ({written['served_format']}) "
        f"in {written['repository']}"
    )


def _registry(args: argparse.Namespace, settings: Settings) -> None:
    from drseg import registry
    from drseg.tracking import tracking_uri

    uri = tracking_uri(settings.tracking, settings.home)
    name = settings.registry.model_name
    if args.action == "promote":
        if args.version is None:
            raise UserError("registry promote needs the VERSION to promote, e.g. 3")
        registry.promote(uri, name, args.version, reason=args.reason)
        print(f"{name}: version {args.version} is @champion")
    elif args.action == "rollback":
        version = registry.rollback(uri, name, reason=args.reason)
        print(f"{name}: rolled back, version {version} is @champion")
    else:
        print(registry.show(uri, name))


def add_verbs(verbs: Verbs) -> None:
    export = add_verb(
        verbs, "export", _export, "ONNX export of a model folder, parity-checked (model.onnx)"
    )
    export.add_argument("--model", type=Path, required=True, help="model folder (finetune)")
    export.add_argument("--dataset", type=Path, required=True, help="dataset folder (clahe)")
    export.add_argument("--out", type=Path, required=True, help="output folder")

    evaluate = add_verb(
        verbs,
        "evaluate",
        _evaluate,
        "score the exported graph as served (and @champion's) on a split, cross-fitted",
    )
    evaluate.add_argument("--onnx", type=Path, required=True, help="export output folder")
    evaluate.add_argument(
        "--dataset", type=Path, required=True, help="dataset folder (ingest, before CLAHE)"
    )
    evaluate.add_argument("--out", type=Path, required=True, help="output folder")
    evaluate.add_argument(
        "--served", type=Path, required=True, help="folder for the graph with tuned thresholds"
    )
    evaluate.add_argument("--split", choices=["val", "train"], default="val")

    gate = add_verb(
        verbs, "gate", _gate, "the evaluation gate; exit 0 pass, 1 fail, 2 cannot decide"
    )
    gate.add_argument("--metrics", type=Path, required=True, help="metrics.json (evaluate)")
    gate.add_argument(
        "--champion-metrics",
        type=Path,
        help="@champion's metrics.json on the same photographs (evaluate's champion/)",
    )
    gate.add_argument("--verdict", type=Path, help="write the verdict JSON (for register)")

    register = add_verb(
        verbs, "register", _register, "register a gated model as @challenger (MLflow)"
    )
    register.add_argument("--served", type=Path, required=True, help="served graph folder")
    register.add_argument("--model", type=Path, required=True, help="model folder (finetune)")
    register.add_argument("--evaluation", type=Path, required=True, help="evaluate output")
    register.add_argument("--verdict", type=Path, required=True, help="drseg gate --verdict file")

    tensorrt = add_verb(
        verbs, "tensorrt", _tensorrt, "TensorRT plan of the served graph, where TensorRT exists"
    )
    tensorrt.add_argument("--served", type=Path, required=True, help="served graph folder")
    tensorrt.add_argument(
        "--dataset", type=Path, required=True, help="dataset folder (ingest): the plan's check"
    )
    tensorrt.add_argument("--out", type=Path, required=True, help="output folder")

    repository = add_verb(
        verbs, "repository", _repository, "a Triton model repository with one version"
    )
    repository.add_argument("--served", type=Path, required=True, help="served graph folder")
    repository.add_argument("--engine", type=Path, required=True, help="tensorrt output folder")
    repository.add_argument("--version", type=int, required=True, help="registry version")
    repository.add_argument("--out", type=Path, required=True, help="repository folder")

    registry = add_verb(
        verbs, "registry", _registry, "MLflow registry: versions, aliases and their history"
    )
    registry.add_argument(
        "action", choices=["show", "promote", "rollback"], nargs="?", default="show"
    )
    registry.add_argument("version", nargs="?", help="version to promote to @champion")
    registry.add_argument("--reason", help="recorded with the alias move")
