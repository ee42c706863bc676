"""Serving verbs: serve and predict on a local Triton."""

from __future__ import annotations

import argparse
from pathlib import Path

from drseg.cli.verb import Verbs, add_verb
from drseg.config import Settings
from drseg.errors import UserError


def _repository(args: argparse.Namespace, settings: Settings) -> Path:
    from drseg.run import RunError, latest_repository

    if args.repository is not None:
        return Path(args.repository)
    try:
        return latest_repository(settings.home)
    except RunError as exc:
        raise UserError(str(exc)) from exc


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
        raise UserError(str(exc)) from exc
    for result in results:
        found = ", ".join(f"{cls} {info['components']}" for cls, info in result.classes.items())
        seconds = result.total_seconds
        print(f"{result.photograph}: {found} lesions ({seconds:.1f} s) -> {result.folder}")


def add_verbs(verbs: Verbs) -> None:
    serve = add_verb(
        verbs, "serve", _serve, "serve a Triton model repository on 127.0.0.1 (Ctrl-C stops)"
    )
    serve.add_argument(
        "--repository", type=Path, help="Triton model repository (default: the newest run's)"
    )
    serve.add_argument("--version", type=int, help="model version (default: the newest)")

    predict = add_verb(verbs, "predict", _predict, "segment photographs on a running Triton server")
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
