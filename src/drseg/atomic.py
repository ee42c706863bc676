"""Atomic writes: a reader sees the old state or the whole new one, never half a file.

Files go to a temporary name in the same folder and are renamed over the target; output
folders are built under a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""mkstemp creates 0600 files; results should get the usual permissions instead."""


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


FAILED_MARKER = ".drseg-failed"
"""Lists the files a failed run left in its output folder (its report): the same command
may replace them, so a failed run never blocks its own re-run."""

_LOCK = ".lock"


def write_failure_report(out: Path, files: dict[str, str]) -> None:
    """Leave `files` (name -> text) in `out` as the report of a failed run."""
    for name, text in files.items():
        write_text(Path(out) / name, text)
    write_text(Path(out) / FAILED_MARKER, json.dumps(sorted(files)))


def _reusable(out: Path) -> bool:
    """`out` is empty, or holds only the report of a failed run. The lock of a working
    folder (another output_dir's, when one output is built inside another) counts as empty."""
    names = {p.name for p in out.iterdir()} - {_LOCK}
    if not names:
        return True
    try:
        listed = json.loads((out / FAILED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(listed, list) and names <= {FAILED_MARKER, *map(str, listed)}


def _claim(folder: Path) -> int | None:
    """An exclusive lock on `folder`'s lock file, held until the descriptor is closed or the
    process dies (kill -9 included); None when another live process holds it."""
    try:
        fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary folders of runs into `out` that died (killed, power loss):
    their lock is free. A folder still locked belongs to a live run and stays."""
    removed = []
    for stale in sorted(out.parent.glob(f".{out.name}.*.partial")):
        if not (stale / _LOCK).exists() and not any(stale.iterdir()):
            continue  # just created by a live run that has not locked it yet
        fd = _claim(stale)
        if fd is None:
            continue
        try:
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(stale)
    return removed


@contextlib.contextmanager
def output_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the block succeeds.

    `out` may exist if it is empty (KFP creates artifact folders in advance) or holds only
    the report of a failed run (replaced); any other non-empty `out` is refused rather than
    overwritten. Temporary folders of killed runs into `out` are removed first.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or not _reusable(out)):
        raise FileExistsError(f"{out}: output folder exists and is not empty; choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    lock = _claim(tmp)
    try:
        yield tmp
        if out.exists():
            if not _reusable(out):
                raise FileExistsError(f"{out}: output folder was filled meanwhile; not replaced")
            shutil.rmtree(out)
        tmp.rename(out)  # still locked: a cleaner never takes a folder on its way out
        (out / _LOCK).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
