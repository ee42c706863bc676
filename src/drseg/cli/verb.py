"""What every verb module of the CLI shares: how a verb is declared and its run id."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable
from typing import Any

Verbs = Any
"""The sub-parsers action of `drseg` (argparse keeps its type private)."""


def add_verb(
    verbs: Verbs, name: str, handler: Callable[..., Any], help_text: str
) -> argparse.ArgumentParser:
    """A `drseg NAME` verb whose handler takes (args, settings)."""
    sub: argparse.ArgumentParser = verbs.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


def pipeline_run_id() -> str:
    """Outside a pipeline, each command is its own "pipeline run" in MLflow."""
    return f"cli-{secrets.token_hex(4)}"
