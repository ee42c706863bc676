"""Serving verbs: serve and predict on a local Triton."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from drseg.cli.verb import Verbs, add_verb
from drseg.config import Settings
from drseg.errors import UserError

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def _repository(args: argparse.Namespace, settings: Settings) -> Path:
    from drseg.run import latest_repository

    return Path(args.repository) if args.repository else latest_repository(settings.home)


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.serving.server import serve

    serve(_repository(args, settings), settings.serve, args.version)


def _registry_contract(uri: str, settings: Settings, folder: Path) -> tuple[int, Path]:
    """(version, model.onnx) of models:/NAME@ALIAS or models:/NAME/VERSION, downloaded."""
    from drseg.registry import download_onnx, version_number
    from drseg.tracking import tracking_uri

    match = _MODEL_URI.match(uri)
    if match is None:
        raise ValueError(
            f"--model {uri!r}: not a registry model URI; pass models:/NAME@ALIAS (e.g. "
            f"models:/{settings.registry.model_name}@champion) or models:/NAME/VERSION"
        )
    from mlflow.exceptions import MlflowException

    registry = tracking_uri(settings.tracking, settings.home)
    try:
        number = version_number(registry, match["name"], match["alias"] or match["version"])
        return int(number), download_onnx(registry, match["name"], number, folder)
    except MlflowException as exc:
        raise RuntimeError(
            f"the registry at {registry} did not answer for {uri} ({exc.message}); check "
            f"tracking.uri (DRSEG_TRACKING__URI) and that the server runs"
        ) from None


def _contract(
    args: argparse.Namespace, settings: Settings, url: str, work: Path
) -> tuple[int, Path]:
    """(version, model.onnx holding its contract): from the registry with --model, else from
    the repository: --version, or the newest version that the server serves."""
    from drseg.serving.client import served_versions
    from drseg.serving.repository import version_onnx

    if args.model is not None:
        if args.version is not None:
            raise ValueError(
                f"--version {args.version} with --model {args.model}: the URI names the "
                f"version already; pass one of them"
            )
        return _registry_contract(args.model, settings, work)
    model_name = settings.serve.model_name
    version = args.version or served_versions(url, args.protocol, model_name)[-1]
    return version_onnx(_repository(args, settings), model_name, version)


def _predict(args: argparse.Namespace, settings: Settings) -> None:
    """One line per photograph; a failed one does not stop the others. Exit status 2 when
    any photograph failed or the call could not run at all."""
    from tritonclient.utils import InferenceServerException

    from drseg.serving.client import PhotoFailure, predict

    serve = settings.serve
    port = serve.grpc_port if args.protocol == "grpc" else serve.http_port
    url = args.server or f"{serve.host}:{port}"
    failed = 0
    try:
        with tempfile.TemporaryDirectory(prefix="drseg-predict-") as work:
            version, model_file = _contract(args, settings, url, Path(work))
            outcomes = predict(
                args.photos,
                url,
                args.protocol,
                args.out,
                model_file,
                serve.model_name,
                max_pixels=settings.ingest.max_pixels,
                version=version,
            )
            for outcome in outcomes:
                if isinstance(outcome, PhotoFailure):
                    failed += 1
                    print(f"drseg predict: error: {outcome.message}", file=sys.stderr, flush=True)
                    continue
                found = ", ".join(
                    f"{cls} {info['components']}" for cls, info in outcome.classes.items()
                )
                how = "already predicted" if outcome.skipped else f"{outcome.total_seconds:.1f} s"
                print(f"{outcome.photograph}: {found} lesions ({how}) -> {outcome.folder}")
    except (ValueError, OSError, RuntimeError, InferenceServerException) as exc:
        # The whole call: the contract, the output folders, the server (ServerUnreachable),
        # the registry.
        message = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
        raise UserError(message) from None
    if failed:
        print(
            f"drseg predict: {failed} of {len(args.photos)} photographs failed (above)",
            file=sys.stderr,
        )
        raise SystemExit(2)


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
    source = predict.add_mutually_exclusive_group()
    source.add_argument(
        "--repository",
        type=Path,
        help="the served repository, whose model.onnx holds each version's contract "
        "(default: the newest run's)",
    )
    source.add_argument(
        "--model",
        help="the contract from the registry instead: models:/NAME@ALIAS or "
        "models:/NAME/VERSION (e.g. models:/drseg-lesions@champion)",
    )
    predict.add_argument(
        "--version",
        type=int,
        help="model version in the repository (default: the newest the server serves)",
    )
