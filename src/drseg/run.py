"""`drseg run`: the training pipeline on this machine, through kfp.local.

The same compiled DAG as on a cluster; kfp.local runs each component as a subprocess of
this Python. Task logs go to ``<run>/pipeline.log``; the terminal gets one line per task
and the summary, which is also written to ``<run>/summary.json``.
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
_PROGRESS = re.compile(r"step \d+/\d+: .*")
"""A training stage's progress line (drseg.train.finetune.PROGRESS_LINES)."""


@dataclass
class _TaskLog(io.TextIOBase):
    """Everything to the log file; only task start/end lines to the terminal."""

    log: TextIO
    terminal: TextIO
    verbose: bool
    display: dict[str, str]
    """Task name -> display name (kfp names a second use of a component "ingest-2")."""
    statuses: dict[str, str] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    _pending: str = ""
    _running: str = ""

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
        if match := _TASK_START.search(line):
            self.started[match[1]] = time.monotonic()
            self._running = self.display.get(match[1], match[1])
            if not self.verbose:
                self.terminal.write(f"  {self._running:<12} running ...\n")
        elif (match := _PROGRESS.search(line)) and not self.verbose:
            self.terminal.write(f"  {self._running:<12} {match[0]}\n")
        elif match := _TASK_END.search(line):
            name, status = match[1], match[2].lower()
            self.statuses[name] = status
            self.seconds[name] = time.monotonic() - self.started.get(name, time.monotonic())
            if not self.verbose:
                shown = self.display.get(name, name)
                self.terminal.write(f"  {shown:<12} {status} in {self.seconds[name]:.1f} s\n")
        self.terminal.flush()

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


@contextlib.contextmanager
def _captured(log_path: Path, verbose: bool, display: dict[str, str]) -> Iterator[_TaskLog]:
    with log_path.open("w") as log:
        tee = _TaskLog(log, sys.stdout, verbose, display)
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
    from kfp import local

    from drseg.pipeline import build, display_names, pipeline_arguments

    if source is not None:
        pipeline_arguments(settings, source, pool)  # refuse a bad request before any work
    home = Path(settings.home).resolve()
    # Components run as subprocesses and read their settings from the environment.
    os.environ["DRSEG_HOME"] = str(home)
    run = paths.new_run_dir(home)
    print(f"run folder: {run}")
    steps: list[dict[str, Any]] = []
    if source is None:
        synth = settings.synth
        source_dir = run / "source"
        started = time.monotonic()
        write_synthetic_dataset(source_dir, synth.n, synth.seed, synth.width, synth.layout)
        # The pool: other photographs (seed + 1), their masks left out of the tree.
        write_synthetic_dataset(run / "pool", synth.pool_n, synth.seed + 1, synth.width)
        source, pool = str(source_dir), str(run / "pool" / "images")
        steps.append(
            {
                "name": "synth",
                "status": "success",
                "seconds": round(time.monotonic() - started, 1),
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
    with _captured(run / "pipeline.log", verbose, display) as log:
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
        print(f"  {'serve':<12} running ...")
        started = time.monotonic()
        dataset_dir = Path(outputs["ingest"]["dataset"]["path"])
        try:
            served = serve_and_predict(settings, Path(repository), dataset_dir, run)
        except Exception as exc:
            error, served = f"serve: {exc}", {}
        status, seconds = "failed" if error else "success", time.monotonic() - started
        print(f"  {'serve':<12} {status} in {seconds:.1f} s")
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
    atomic.write_text(run / paths.SUMMARY, json.dumps(summary, indent=2) + "\n")
    return run


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
    if "error" in summary:
        lines += ["", f"error: {summary['error']}", f"full log: {summary['log']}"]
    lines.append(f"\nsummary: {run / paths.SUMMARY}")
    return "\n".join(lines)


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
