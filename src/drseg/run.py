"""`drseg run`: the training pipeline on this machine, through kfp.local.

The same compiled DAG as on a cluster; kfp.local runs each component as a subprocess of
this Python. Task logs go to ``<run>/pipeline.log``; the terminal gets one line per task
and the summary, which is also written to ``<run>/summary.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from drseg import atomic, paths
from drseg.config import Settings
from drseg.data.synthetic import write_synthetic_dataset

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '([\w-]+)'")
_TASK_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")


@dataclass
class _TaskLog(io.TextIOBase):
    """Everything to the log file; only task start/end lines to the terminal."""

    log: TextIO
    terminal: TextIO
    verbose: bool
    statuses: dict[str, str] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    _pending: str = ""

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.terminal.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._parse(_ANSI.sub("", line))
        return len(text)

    def _parse(self, line: str) -> None:
        if match := _TASK_START.search(line):
            self.started[match[1]] = time.monotonic()
            if not self.verbose:
                self.terminal.write(f"  {match[1]:<12} running ...\n")
        elif match := _TASK_END.search(line):
            name, status = match[1], match[2].lower()
            self.statuses[name] = status
            self.seconds[name] = time.monotonic() - self.started.get(name, time.monotonic())
            if not self.verbose:
                self.terminal.write(f"  {name:<12} {status} in {self.seconds[name]:.1f} s\n")
        self.terminal.flush()

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


@contextlib.contextmanager
def _captured(log_path: Path, verbose: bool) -> Iterator[_TaskLog]:
    with log_path.open("w") as log:
        tee = _TaskLog(log, sys.stdout, verbose)
        with contextlib.redirect_stdout(tee):
            yield tee


def pipeline_arguments(settings: Settings, source: str) -> dict[str, Any]:
    """Settings -> the pipeline's parameters (names as in pipelines/training.py)."""
    ingest, clahe = settings.ingest, settings.clahe
    return {
        "source": source,
        "layout": ingest.layout,
        "working_width": ingest.working_width,
        "classes": list(ingest.classes),
        "val_fraction": ingest.val_fraction,
        "split_seed": ingest.split_seed,
        "min_records": ingest.min_records,
        "clip_limit": clahe.clip_limit,
        "tile_grid": clahe.tile_grid,
    }


def task_outputs(pipeline_root: Path, task: str) -> dict[str, Any]:
    """A finished task's parameters and artifacts (path + metadata), from its executor output."""
    found = sorted(pipeline_root.glob(f"*/{task}/executor_output.json"))
    if not found:
        return {}
    record = json.loads(found[-1].read_text())
    outputs: dict[str, Any] = dict(record.get("parameterValues", {}))
    for name, group in record.get("artifacts", {}).items():
        artifact = group["artifacts"][0]
        outputs[name] = {"path": artifact["uri"], "metadata": artifact.get("metadata", {})}
    return outputs


def run_pipeline(settings: Settings, source: str | None = None, verbose: bool = False) -> Path:
    """Run the whole pipeline locally; returns the run folder (its summary.json says how)."""
    from kfp import local
    from pipelines.training import training

    run = paths.new_run_dir(settings.home)
    print(f"run folder: {run}")
    steps: list[dict[str, Any]] = []
    if source is None:
        synth = settings.synth
        source_dir = run / "source"
        started = time.monotonic()
        write_synthetic_dataset(source_dir, synth.n, synth.seed, synth.width, synth.layout)
        source = str(source_dir)
        steps.append(
            {
                "name": "synth",
                "status": "success",
                "seconds": round(time.monotonic() - started, 1),
                "outputs": {"photographs": synth.n, "path": source, "seed": synth.seed},
            }
        )

    # kfp warns that our runtime image may differ from this venv; locally it is this venv.
    warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run / "kfp"),
        raise_on_error=True,
    )
    summary: dict[str, Any] = {"run": run.name, "source": source, "steps": steps}
    error = None
    with _captured(run / "pipeline.log", verbose) as log:
        try:
            training(**pipeline_arguments(settings, source))
        except Exception as exc:
            error = str(exc)
    for name in log.started:
        steps.append(
            {
                "name": name,
                "status": log.statuses.get(name, "failed"),
                "seconds": round(log.seconds.get(name, 0.0), 1),
                "outputs": task_outputs(run / "kfp", name),
            }
        )
    summary["status"] = "failed" if error else "succeeded"
    if error:
        summary["error"] = error
    summary["log"] = str(run / "pipeline.log")
    atomic.write_text(run / paths.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return run


def format_run_summary(summary: dict[str, Any], run: Path) -> str:
    """What `drseg run` prints at the end: steps, the ingest table, where things are."""
    from drseg.data.ingest import format_summary

    lines = [f"\npipeline {summary['status']}  ({run})", ""]
    for step in summary["steps"]:
        lines.append(f"  {step['name']:<10} {step['status']:<9} {step['seconds']:>7.1f} s")
    ingest = next((s for s in summary["steps"] if s["name"] == "ingest"), None)
    if ingest and "dataset" in ingest["outputs"]:
        lines += ["", "ingest", format_summary(ingest["outputs"]["dataset"]["metadata"])]
    lines.append("")
    for step in summary["steps"]:
        for name, value in step["outputs"].items():
            if isinstance(value, dict) and "path" in value:
                lines.append(f"  {step['name']}.{name}: {value['path']}")
    if "error" in summary:
        lines += ["", f"error: {summary['error']}", f"full log: {summary['log']}"]
    lines.append(f"\nsummary: {run / paths.SUMMARY}")
    return "\n".join(lines)
