"""Nothing outlives a killed command: ingest's worker processes and its temporary folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from drseg import atomic
from drseg.parallel import parallel_map

REPO = Path(__file__).resolve().parents[2]


def _block(folder: str) -> None:
    """A task that never ends: records its pid and its parent's (the fork server), waits."""
    Path(folder, f"worker-{os.getpid()}").write_text(str(os.getppid()))
    threading.Event().wait()


def run_blocked(out: str) -> None:
    """What the killed command does: an output folder being filled by two blocked workers."""
    with atomic.output_dir(Path(out)) as tmp:
        (tmp / "half-written").write_text("x")
        list(parallel_map(_block, [str(Path(out).parent)] * 4, 2, "blocked"))


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (the reaper has not collected it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_for(condition: object, what: str, limit_s: float = 120) -> None:
    """Poll until `condition()`; the limit only ends a test that would otherwise hang."""
    deadline = time.monotonic() + limit_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def test_workers_and_fork_server_end_with_a_killed_parent(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    command = "import sys, tests.data.test_parallel as t; t.run_blocked(sys.argv[1])"
    parent = subprocess.Popen([sys.executable, "-c", command, str(out)], env=env, cwd=REPO)
    try:
        _wait_for(lambda: len(list(tmp_path.glob("worker-*"))) == 2, "two blocked workers")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    workers = [int(p.name.removeprefix("worker-")) for p in tmp_path.glob("worker-*")]
    servers = {int(p.read_text()) for p in tmp_path.glob("worker-*")}
    _wait_for(lambda: all(_gone(pid) for pid in [*workers, *servers]), "workers to end")

    (partial,) = tmp_path.glob(".dataset.*.partial")
    assert (partial / "half-written").exists()
    with atomic.output_dir(out) as tmp:
        (tmp / "done").write_text("y")
    assert not partial.exists()
    assert [p.name for p in out.iterdir()] == ["done"]


def test_a_live_runs_temporary_folder_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    with atomic.output_dir(out) as live:
        (live / "half-written").write_text("x")
        assert atomic.remove_stale_partials(out) == []
        assert (live / "half-written").exists()
    assert (out / "half-written").exists()
    assert not list(tmp_path.glob(".dataset.*"))


def test_results_keep_their_order_across_processes() -> None:
    assert list(parallel_map(abs, [-3, 1, -2, 5], 2, "abs")) == [3, 1, 2, 5]
