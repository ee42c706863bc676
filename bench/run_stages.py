"""Per-stage seconds of a `drseg run`: where the wall time of the pipeline goes.

Reads a finished run's summary.json (the newest run of a workspace by default), or runs the
pipeline first with --run. For the stages that time their own work (pretrain, finetune:
the training loop; export: the ONNX export) the rest of the stage's seconds is shown as
overhead: the component's process start, imports, data loading, checkpoints, tracking.

    .venv/bin/python bench/run_stages.py                       # newest run under .drseg
    .venv/bin/python bench/run_stages.py --summary RUN/summary.json
    .venv/bin/python bench/run_stages.py --run --config configs/local.yaml --home /tmp/w
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

WORK_SECONDS = {"pretrain": ("encoder", "seconds"), "finetune": ("model", "seconds")}
"""Stage -> (artifact, metadata key) of the seconds the stage spent on its own work."""


def _work_seconds(step: dict[str, Any]) -> float | None:
    outputs = step.get("outputs", {})
    if step["name"] == "export":
        seconds = outputs.get("onnx", {}).get("metadata", {}).get("export_seconds")
        return None if seconds is None else float(seconds)
    if step["name"] not in WORK_SECONDS:
        return None
    artifact, key = WORK_SECONDS[step["name"]]
    metadata = outputs.get(artifact, {}).get("metadata", {})
    if metadata.get("skipped"):
        return 0.0
    return None if key not in metadata else float(metadata[key])


def stage_table(summary: dict[str, Any]) -> str:
    """The table: per stage its status, seconds, share of the wall time, and for the stages
    that time their work, work and overhead seconds."""
    wall = float(summary.get("seconds") or sum(s["seconds"] for s in summary["steps"]))
    rows = [f"{'stage':<18} {'status':<8} {'seconds':>8} {'share':>6} {'work':>8} {'overhead':>8}"]
    for step in summary["steps"]:
        work = _work_seconds(step)
        cells = f"{step['seconds']:>8.1f} {100 * step['seconds'] / wall:>5.1f}%"
        extra = "" if work is None else f" {work:>8.1f} {step['seconds'] - work:>8.1f}"
        rows.append(f"{step['name']:<18} {step['status']:<8} {cells}{extra}")
    listed = sum(s["seconds"] for s in summary["steps"])
    rows.append(f"{'stages together':<18} {'':<8} {listed:>8.1f} {100 * listed / wall:>5.1f}%")
    source = "wall, summary.json" if summary.get("seconds") else "sum of stages"
    rows.append(f"{'run':<18} {summary['status']:<8} {wall:>8.1f}  ({source})")
    return "\n".join(rows)


def run_pipeline(config: Path, home: Path, environ: dict[str, str]) -> Path:
    """`drseg --config CONFIG run` in a fresh process with DRSEG_HOME=home, as `make run`
    runs it; returns the run's summary.json."""
    env = {**os.environ, **environ, "DRSEG_HOME": str(home)}
    drseg = Path(sys.executable).with_name("drseg")
    command = [str(drseg), "--config", str(config), "run"]
    subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL)
    return home / "runs" / "latest" / "summary.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, help="a run's summary.json")
    parser.add_argument("--home", type=Path, default=Path(".drseg"), help="workspace")
    parser.add_argument("--run", action="store_true", help="run the pipeline first")
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    args = parser.parse_args()
    if args.run:
        path = run_pipeline(args.config, args.home.resolve(), {})
    else:
        path = args.summary or args.home / "runs" / "latest" / "summary.json"
    if not path.is_file():
        sys.exit(f"{path}: no summary.json; run the pipeline (--run) or pass --summary")
    summary = json.loads(path.read_text())
    print(f"{path.parent}\n")
    print(stage_table(summary))


if __name__ == "__main__":
    main()
