"""`drseg run`: the training pipeline on this machine, through kfp.local.

The same compiled DAG as on a cluster; kfp.local runs each component as a subprocess of
this Python. Task logs go to ``<run>/pipeline.log``. A terminal shows the run as one live
table (each stage's status and seconds, a progress bar with the time left while training);
anything else (a pipe, a file, CI) gets one plain line per stage event. Then the summary,
also written to ``<run>/summary.json`` with each stage's seconds and the run's wall time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
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
from drseg.errors import UserError
from drseg.evaluate.schema import METRICS_FILE, Metrics
from drseg.secrets import redact

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '([\w-]+)'")
_TASK_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
_PROGRESS = re.compile(r"step (\d+)/(\d+): .*?(?:about (\d+) s left)?$")
"""A training stage's progress line (drseg.train.finetune.PROGRESS_LINES)."""


class PlainLines:
    """The run as plain lines, one per stage event: for pipes, files, CI and `kubectl logs`,
    where a redrawn display would be a mess of control characters."""

    def __init__(self, terminal: TextIO) -> None:
        self.terminal = terminal

    def started(self, stage: str) -> None:
        self._line(f"  {stage:<12} running ...")

    def progress(self, stage: str, step: int, total: int, left: float | None, line: str) -> None:
        self._line(f"  {stage:<12} {line}")

    def finished(self, stage: str, status: str, seconds: float) -> None:
        self._line(f"  {stage:<12} {status} in {seconds:.1f} s")

    def close(self) -> None:
        pass

    def _line(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()


@dataclass
class _Stage:
    status: str = "running"
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    step: int = 0
    total: int = 0
    left: float | None = None
    """Seconds left, as the stage last said, at `said`."""
    said: float = 0.0


class LiveTable:
    """The run as one live table on a terminal: each stage's status and seconds (ticking
    while it runs), and for the training stages a progress bar with the time left."""

    def __init__(self, terminal: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self.stages: dict[str, _Stage] = {}
        # stdout is the task log's tee while the run goes on: the table draws on `terminal`
        # itself. Warnings on stderr are printed above the table, not through it.
        self.live = Live(
            console=Console(file=terminal),
            get_renderable=self._table,
            refresh_per_second=4,
            redirect_stdout=False,
            redirect_stderr=True,
        )
        self.live.start()

    def started(self, stage: str) -> None:
        self.stages[stage] = _Stage()

    def progress(self, stage: str, step: int, total: int, left: float | None, line: str) -> None:
        row = self.stages.setdefault(stage, _Stage())
        row.step, row.total, row.left, row.said = step, total, left, time.monotonic()

    def finished(self, stage: str, status: str, seconds: float) -> None:
        row = self.stages.setdefault(stage, _Stage())
        row.status, row.seconds = status, seconds
        if status == "success" and row.total:
            row.step = row.total

    def close(self) -> None:
        self.live.stop()

    def _table(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, show_header=False, padding=(0, 1))
        for justify in ("left", "left", "right", "left", "left"):
            table.add_column(justify=justify, no_wrap=True)
        now = time.monotonic()
        for name, row in list(self.stages.items()):
            seconds = now - row.started if row.seconds is None else row.seconds
            style = {"running": "yellow", "success": "green"}.get(row.status, "red")
            cells: list[Any] = [name, f"[{style}]{row.status}[/]", f"{seconds:7.1f} s"]
            if row.total:
                note = f"step {row.step}/{row.total}"
                if row.status == "running" and row.left is not None:
                    left = max(0.0, row.left - (now - row.said))
                    note += f", about {left:.0f} s left"
                cells += [ProgressBar(total=row.total, completed=row.step, width=20), note]
            table.add_row(*cells)
        return table


StageView = PlainLines | LiveTable


def stage_view(terminal: TextIO, verbose: bool) -> StageView:
    """A live table on a terminal; plain lines elsewhere, and with --verbose, whose stream
    of task output a redrawn table would fight."""
    if terminal.isatty() and not verbose:
        return LiveTable(terminal)
    return PlainLines(terminal)


@dataclass
class _TaskLog(io.TextIOBase):
    """Everything to the log file; task starts, ends and training progress to the view."""

    log: TextIO
    terminal: TextIO
    verbose: bool
    display: dict[str, str]
    """Task name -> display name (kfp names a second use of a component "ingest-2")."""
    view: StageView | None = None
    """Where stage events go (default: plain lines on `terminal`); unused with verbose,
    where the terminal gets every task's own output instead."""
    statuses: dict[str, str] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    _pending: str = ""
    _running: str = ""

    def __post_init__(self) -> None:
        if self.view is None and not self.verbose:
            self.view = PlainLines(self.terminal)

    def write(self, text: str) -> int:
        shown = redact(text)  # a task's traceback may print a URI with its credentials
        self.log.write(shown)
        if self.verbose:
            self.terminal.write(shown)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._parse(_ANSI.sub("", line))
        return len(text)

    def _parse(self, line: str) -> None:
        view = None if self.verbose else self.view
        if match := _TASK_START.search(line):
            self.started[match[1]] = time.monotonic()
            self._running = self.display.get(match[1], match[1])
            if view:
                view.started(self._running)
        elif (match := _PROGRESS.search(line)) and view:
            left = None if match[3] is None else float(match[3])
            view.progress(self._running, int(match[1]), int(match[2]), left, match[0])
        elif match := _TASK_END.search(line):
            name, status = match[1], match[2].lower()
            self.statuses[name] = status
            self.seconds[name] = time.monotonic() - self.started.get(name, time.monotonic())
            if view:
                view.finished(self.display.get(name, name), status, self.seconds[name])
        self.terminal.flush()

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


@contextlib.contextmanager
def _captured(
    log_path: Path, verbose: bool, display: dict[str, str], view: StageView
) -> Iterator[_TaskLog]:
    with log_path.open("w") as log:
        tee = _TaskLog(log, sys.stdout, verbose, display, view)
        with contextlib.redirect_stdout(tee):
            yield tee


class RunError(UserError, ValueError):
    """The run cannot start as asked; the message says what to pass instead."""


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


def run_pipeline(
    settings: Settings, source: str | None = None, pool: str | None = None, verbose: bool = False
) -> Path:
    """Run the whole pipeline locally; returns the run folder (its summary.json says how).

    Without a source, synthetic photographs are made for it and for the pool.
    """
    from drseg.pipeline import pipeline_arguments

    if source is not None:
        pipeline_arguments(settings, source, pool)  # refuse a bad request before any work
    home = Path(settings.home).resolve()
    # Components run as subprocesses and read their settings from the environment.
    os.environ["DRSEG_HOME"] = str(home)
    run = paths.new_run_dir(home)
    print(f"run folder: {run}")
    started = time.monotonic()
    view = stage_view(sys.stdout, verbose)
    try:
        summary = _run_stages(settings, run, source, pool, verbose, view)
    finally:
        view.close()
    summary["seconds"] = round(time.monotonic() - started, 1)
    atomic.write_text(run / paths.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return run


def _run_stages(
    settings: Settings,
    run: Path,
    source: str | None,
    pool: str | None,
    verbose: bool,
    view: StageView,
) -> dict[str, Any]:
    """Synthetic data when no source is given, the pipeline through kfp.local, then the
    repository served and queried; returns the run's summary."""
    from kfp import local

    from drseg.pipeline import build, display_names, pipeline_arguments

    steps: list[dict[str, Any]] = []
    if source is None:
        synth = settings.synth
        source_dir = run / "source"
        started = time.monotonic()
        view.started("synth")
        write_synthetic_dataset(
            source_dir, synth.n, synth.seed, synth.width, synth.layout, progress=False
        )
        # The pool: other photographs (seed + 1), their masks left out of the tree.
        write_synthetic_dataset(
            run / "pool", synth.pool_n, synth.seed + 1, synth.width, progress=False
        )
        source, pool = str(source_dir), str(run / "pool" / "images")
        seconds = time.monotonic() - started
        view.finished("synth", "success", seconds)
        steps.append(
            {
                "name": "synth",
                "status": "success",
                "seconds": round(seconds, 1),
                "outputs": {
                    "photographs": synth.n,
                    "path": source,
                    "pool_photographs": synth.pool_n,
                    "pool": pool,
                    "seed": synth.seed,
                },
            }
        )

    # kfp warns that our runtime image may differ from this venv; locally it is this venv.
    warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
    # GPU requests are for the cluster; kfp.local says it ignores them, which is expected.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run / "kfp"),
        raise_on_error=True,
    )
    summary: dict[str, Any] = {"run": run.name, "source": source, "steps": steps}
    error = None
    training = build(
        settings.cluster, settings.pretrain.include_labelled, publish_to_store=False, retry=False
    )
    display = display_names(training)
    with _captured(run / "pipeline.log", verbose, display, view) as log:
        try:
            training(**pipeline_arguments(settings, source, pool))
        except Exception as exc:
            error = redact(str(exc))
    for name in log.started:
        steps.append(
            {
                "name": display.get(name, name),
                "status": log.statuses.get(name, "failed"),
                "seconds": round(log.seconds.get(name, 0.0), 1),
                "outputs": task_outputs(run / "kfp", name),
            }
        )
    outputs = {step["name"]: step["outputs"] for step in steps}
    engine = outputs.get("tensorrt", {}).get("engine", {}).get("metadata", {})
    if engine:
        summary["served"] = {"format": engine["served_format"], "reason": engine["reason"]}
    repository = outputs.get("triton-repository", {}).get("repository", {}).get("path")
    if not error and repository and engine["served_format"] == "onnx":
        # The pipeline ends at the model repository; here it is also served and queried.
        view.started("serve")
        started = time.monotonic()
        dataset_dir = Path(outputs["ingest"]["dataset"]["path"])
        try:
            served = serve_and_predict(settings, Path(repository), dataset_dir, run)
        except Exception as exc:
            error, served = f"serve: {exc}", {}
        status, seconds = "failed" if error else "success", time.monotonic() - started
        view.finished("serve", status, seconds)
        steps.append(
            {"name": "serve", "status": status, "seconds": round(seconds, 1), "outputs": served}
        )
        summary["served"] |= served
    summary["status"] = "failed" if error else "succeeded"
    if error:
        summary["error"] = error
    verdict = outputs.get("gate", {}).get("verdict", {}).get("metadata", {})
    if not error and verdict.get("passed") is False:
        summary["status"] = "gated"
        summary["reason"] = f"evaluation gate {verdict['summary']}; nothing was registered"
    summary["log"] = str(run / "pipeline.log")
    return summary


DEMO_PHOTOGRAPHS = 3
"""Validation photographs `drseg run` sends through the served model at the end."""


def serve_and_predict(
    settings: Settings, repository: Path, dataset_dir: Path, run: Path
) -> dict[str, Any]:
    """Serve the repository's newest version on a local Triton, predict a few validation
    photographs of the run's source over HTTP as `drseg predict` does, and stop the server.

    Returns what the summary reports: the served version, where the predictions are, and
    the median round trip of one photograph (request, inference, response).
    """
    from drseg.data.dataset import load_manifest
    from drseg.serving.client import PhotoFailure, PhotoResult, predict
    from drseg.serving.server import running_server

    records = [r for r in load_manifest(dataset_dir).records if r.split == "val"]
    photos = [Path(r.source) for r in records[:DEMO_PHOTOGRAPHS] if Path(r.source).is_file()]
    if not photos:
        return {"predicted": 0, "note": "the source is not a local folder: nothing predicted"}
    out = run / "predictions"
    with running_server(repository, settings.serve, log_file=run / "triton.log") as server:
        outcomes = list(
            predict(
                photos,
                server.http_url,
                "http",
                out,
                server.model.onnx_path,
                settings.serve.model_name,
                max_pixels=settings.ingest.max_pixels,
            )
        )
        results = [o for o in outcomes if isinstance(o, PhotoResult)]
        version = server.model.version
    failures = [o.message for o in outcomes if isinstance(o, PhotoFailure)]
    if failures:
        raise RuntimeError("; ".join(failures))
    seconds = sorted(r.infer_seconds for r in results)
    return {
        "version": version,
        "predicted": len(results),
        "predictions": str(out),
        "latency_ms_median": round(1000 * seconds[len(seconds) // 2], 1),
        "latency": "one photograph over HTTP to the local Triton and back (CPU)",
    }


def format_metrics(metrics: Metrics) -> str:
    """Per-lesion table of an evaluation: cross-fitted AUPR, Dice, IoU, shipped threshold."""
    rows = [f"{'class':<6} {'AUPR':>6} {'Dice':>6} {'IoU':>6} {'thr':>5}"]
    for cls, values in metrics.classes.items():
        cells = (values.aupr, values.dice, values.iou)
        shown = " ".join("   n/a" if v is None else f"{v:>6.3f}" for v in cells)
        rows.append(f"{cls:<6} {shown} {values.threshold:>5.2f}")
    rows.append("(n/a: undefined, e.g. no lesion of that class in the split and none predicted)")
    merged = metrics.merged.dice
    rows.append(f"any-lesion Dice {'n/a' if merged is None else f'{merged:.3f}'}")
    if metrics.thresholds == "cross_fitted":
        rows.append(
            f"Dice and IoU cross-fitted over {metrics.folds} folds; thr: the shipped "
            "threshold (tuned on the whole split)"
        )
    return "\n".join(rows)


def format_run_summary(summary: dict[str, Any], run: Path) -> str:
    """What `drseg run` prints at the end: steps, the ingest table, where things are."""
    from drseg.data.ingest import format_summary

    lines = [f"\npipeline {summary['status']}  ({run})", ""]
    for step in summary["steps"]:
        lines.append(f"  {step['name']:<10} {step['status']:<9} {step['seconds']:>7.1f} s")
    if "seconds" in summary:
        lines.append(f"  {'all':<10} {'':<9} {summary['seconds']:>7.1f} s (wall)")
    ingest = next((s for s in summary["steps"] if s["name"] == "ingest"), None)
    if ingest and "dataset" in ingest["outputs"]:
        lines += ["", "ingest", format_summary(ingest["outputs"]["dataset"]["metadata"])]
    evaluate = next((s for s in summary["steps"] if s["name"] == "evaluate"), None)
    if evaluate and "evaluation" in evaluate["outputs"]:
        metrics = Metrics.read(Path(evaluate["outputs"]["evaluation"]["path"]) / METRICS_FILE)
        lines += ["", f"evaluate (validation split; {metrics.scored})", format_metrics(metrics)]
    gate = next((s for s in summary["steps"] if s["name"] == "gate"), None)
    if gate and "report" in gate["outputs"]:
        lines += ["", Path(gate["outputs"]["report"]["path"]).read_text().rstrip()]
    if "reason" in summary:
        lines += ["", f"gated: {summary['reason']}"]
    register = next((s for s in summary["steps"] if s["name"] == "register"), None)
    if register and "Output" in register["outputs"]:
        lines += ["", f"registered version {register['outputs']['Output']} as @challenger"]
    if "served" in summary:
        served = summary["served"]
        lines.append(f"served format: {served['format']} ({served['reason']})")
        if served.get("predicted"):
            lines.append(
                f"served version {served['version']} on a local Triton: {served['predicted']} "
                f"photographs predicted, median latency {served['latency_ms_median']} ms "
                f"-> {served['predictions']}"
            )
    lines.append("")
    for step in summary["steps"]:
        for name, value in step["outputs"].items():
            if isinstance(value, dict) and "path" in value:
                lines.append(f"  {step['name']}.{name}: {value['path']}")
    lines += _where_to_look(evaluate, summary.get("served", {}))
    if "error" in summary:
        lines += ["", f"error: {summary['error']}", f"full log: {summary['log']}"]
    lines.append(f"\nsummary: {run / paths.SUMMARY}")
    return "\n".join(lines)


def _where_to_look(evaluate: dict[str, Any] | None, served: dict[str, Any]) -> list[str]:
    """The pictures a person opens first: the evaluation's overlays and report, and the
    served model's predictions."""
    from drseg.evaluate.report import OVERLAYS_DIR, REPORT_FILE
    from drseg.serving.client import OVERLAY_FILE

    lines = []
    evaluation = (evaluate or {}).get("outputs", {}).get("evaluation", {}).get("path")
    if evaluation and (Path(evaluation) / OVERLAYS_DIR).is_dir():
        lines.append(
            f"  overlays     {Path(evaluation) / OVERLAYS_DIR}  (photograph | prediction filled, "
            "ground truth outlined; class colours in the legend underneath)"
        )
    if evaluation:
        lines.append(f"  report       {Path(evaluation) / REPORT_FILE}")
    if served.get("predictions"):
        lines.append(
            f"  predictions  {served['predictions']}  (per photograph: {OVERLAY_FILE}, "
            "mask_<class>.png, lesions.json)"
        )
    return ["", "look at:", *lines] if lines else []


def latest_repository(home: Path) -> Path:
    """The Triton model repository the newest run wrote (for `drseg serve` / `predict`)."""
    summary_path = paths.latest_run(home) / paths.SUMMARY
    if not summary_path.is_file():
        raise RunError(
            f"{summary_path}: no run yet; run `drseg run` (or `make run`), or pass --repository"
        )
    summary = json.loads(summary_path.read_text())
    for step in summary["steps"]:
        if step["name"] == "triton-repository" and "repository" in step["outputs"]:
            return Path(step["outputs"]["repository"]["path"])
    raise RunError(
        f"{summary_path}: the newest run (status {summary['status']}) wrote no Triton "
        "repository; pass --repository, or run until a model passes the gate"
    )
