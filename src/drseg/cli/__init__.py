"""`drseg <verb>`: one verb per pipeline step, plus `run` for the whole pipeline.

Each module here declares the verbs of one concern (`add_verbs`); this one builds the parser
and holds the one error handler. Exit status, the same for every verb: 0 done; 1 the verb's
verdict or check failed (a step of `drseg run`, an aborted canary); 2 could not act (bad
settings, a wrong path or argument, a server that cannot be reached), printed as one line
that names the problem and the fix, with the traceback only under `drseg --verbose`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from urllib.parse import urlsplit

from drseg.cli import cluster, data, model, serving, training
from drseg.config import Settings, load_settings, settings_as_yaml
from drseg.errors import UserError
from drseg.secrets import redact, redact_logs

EPILOG = """\
settings: defaults < YAML file (--config or DRSEG_CONFIG) < DRSEG_<SECTION>__<FIELD> variables,
e.g. DRSEG_INGEST__WORKING_WIDTH=2048. `drseg config show` prints the effective settings.

exit status: 0 done; 1 the verb's verdict or check failed (a step of `run`, the canary); 2
could not act (the error line names the problem and the fix; --verbose adds the traceback).
"""


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
    parser.add_argument(
        "--verbose",
        dest="traceback",
        action="store_true",
        help="on an error, print its traceback too",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in (training, data, model, serving, cluster):
        module.add_verbs(verbs)

    config = verbs.add_parser("config", help="settings", description="settings")
    config.set_defaults(handler=lambda *_: config.print_help())
    config_verbs = config.add_subparsers(dest="config_verb", metavar="ACTION")
    show = config_verbs.add_parser("show", help="print the effective settings (secrets masked)")
    show.set_defaults(handler=_config_show)
    return parser


def _unreachable(exc: BaseException) -> OSError | None:
    """The refused or failed connection under an exception (MLflow wraps it in its own)."""
    seen: BaseException | None = exc
    found = None
    while seen is not None:
        if isinstance(seen, OSError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def _mlflow_message(exc: Exception, tracking: str | None) -> str | None:
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    # Only the host: a tracking URI may carry credentials.
    host = urlsplit(tracking).hostname if tracking else None
    where = f" at {host}" if host else ""
    cause = _unreachable(exc)
    if cause is not None:
        reason = cause.strerror or type(cause).__name__
        return (
            f"cannot reach the MLflow tracking server{where} ({reason}); start it, or point "
            "tracking.uri (DRSEG_TRACKING__URI) at one that runs"
        )
    if exc.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return (
            f"the MLflow tracking server{where} refused the request ({exc.error_code}); set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or the token) it accepts"
        )
    return None


def user_message(exc: Exception, settings: Settings | None = None) -> str | None:
    """The one line to print for an error the user can fix; None for a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}; check the path and its permissions"
        return str(exc)
    tracking = settings.tracking.uri if settings is not None else None
    return _mlflow_message(exc, tracking)


def main(argv: list[str] | None = None) -> None:
    """Run one verb; the single place where drseg reports an error to the user."""
    redact_logs()
    args = build_parser().parse_args(argv)
    settings = None
    try:
        settings = load_settings(args.config)
        args.handler(args, settings)
    except Exception as exc:
        message = user_message(exc, settings)
        # A bug keeps its traceback, which is what a report needs; its status is still 2,
        # not Python's 1, which would read as a failed verdict.
        trace = traceback.format_exc() if message is None or args.traceback else ""
        if message is None:
            message = f"internal error ({type(exc).__name__}); please report it with the above"
        line = f"drseg {args.verb}: error: {' '.join(message.split())}\n"
        sys.stderr.write(redact(trace + line))
        raise SystemExit(2) from None
