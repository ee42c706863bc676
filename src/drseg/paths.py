"""Where local runs write: ``<home>/runs/<run-id>/``, with ``<home>/runs/latest`` -> newest.

`home` is settings.home (``.drseg`` in the working directory, or DRSEG_HOME).
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

SUMMARY = "summary.json"


def runs_dir(home: Path) -> Path:
    return Path(home) / "runs"


def latest_run(home: Path) -> Path:
    return runs_dir(home) / "latest"


def new_run_dir(home: Path) -> Path:
    """Create a uniquely named run folder and point `latest` at it (atomically)."""
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    run = runs_dir(home) / run_id
    run.mkdir(parents=True)
    link = latest_run(home)
    tmp = link.with_name(f".latest.{run_id}")
    tmp.symlink_to(run_id)
    os.replace(tmp, link)
    return run
