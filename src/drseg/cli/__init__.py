"""`drseg <verb>`: one verb per pipeline step, plus `run` for the whole pipeline.

Each module here declares the verbs of one concern (`add_verbs`); this one builds the parser
and holds the one error handler.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from types import TracebackType

from drseg.cli import cluster, data, model, serving, training
from drseg.config import Settings, SettingsError, load_settings, settings_as_yaml
from drseg.secrets import redact, redact_logs

EPILOG = """\
settings: defaults < YAML file (--config or DRSEG_CONFIG) < DRSEG_<SECTION>__<FIELD> variables,
e.g. DRSEG_INGEST__WORKING_WIDTH=2048. `drseg config show` prints the effective settings.
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
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in (training, data, model, serving, cluster):
        module.add_verbs(verbs)

    config = verbs.add_parser("config", help="settings", description="settings")
    config.set_defaults(handler=lambda *_: config.print_help())
    config_verbs = config.add_subparsers(dest="config_verb", metavar="ACTION")
    show = config_verbs.add_parser("show", help="print the effective settings (secrets masked)")
    show.set_defaults(handler=_config_show)
    return parser


def _redacted_traceback(
    kind: type[BaseException], exc: BaseException, trace: TracebackType | None
) -> None:
    """An unexpected error's traceback, with credentials inside URLs masked (drseg.secrets)."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, trace))))


def main(argv: list[str] | None = None) -> None:
    sys.excepthook = _redacted_traceback
    redact_logs()
    args = build_parser().parse_args(argv)
    from drseg.data.dataset import DatasetError
    from drseg.data.ingest import IngestError
    from drseg.data.storage import StorageError
    from drseg.tracking import TrackingError

    try:
        settings = load_settings(args.config)
        args.handler(args, settings)
    except (
        SettingsError,
        IngestError,
        StorageError,
        DatasetError,
        FileExistsError,
        TrackingError,
    ) as exc:
        print(f"drseg {args.verb}: error: {redact(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None
