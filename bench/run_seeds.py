"""`make run` on several synthetic seeds: does every one pass the default gate, by how much,
and in how many seconds.

Each seed runs `drseg --config CONFIG run` in a fresh process and a fresh workspace
(<work>/seed<N>: its own MLflow, so no @champion and the regression rule is not applicable)
with DRSEG_SYNTH__SEED=N, exactly as `make run` runs, one seed after another. The table:
status, wall seconds, fine-tune seconds, merged Dice and its margin over the gate's minimum,
per-class Dice and the lowest margin over the class floors (negative: below it).

    .venv/bin/python bench/run_seeds.py --seeds 0,1,2,3,4 --work /tmp/drseg-seeds
    .venv/bin/python bench/run_seeds.py --table-only --work /tmp/drseg-seeds   # reread
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_stages.py, beside this file
from drseg.config import GateSettings, load_settings
from drseg.evaluate.schema import METRICS_FILE, Metrics
from run_stages import run_pipeline


def _step(summary: dict[str, Any], name: str) -> dict[str, Any]:
    return next((s for s in summary["steps"] if s["name"] == name), {"seconds": 0, "outputs": {}})


def seed_row(seed: int, summary: dict[str, Any], gate: GateSettings) -> str:
    """One seed's line of the table."""
    finetune = _step(summary, "finetune")["seconds"]
    head = f"{seed:>4} {summary['status']:<9} {summary.get('seconds', 0):>6.0f} {finetune:>8.0f}"
    evaluation = _step(summary, "evaluate")["outputs"].get("evaluation", {}).get("path")
    if not evaluation:
        return f"{head}  (no evaluation: {summary.get('error', 'stopped before it')})"
    metrics = Metrics.read(Path(evaluation) / METRICS_FILE)
    merged = metrics.merged.dice or 0.0
    dice = {cls: values.dice or 0.0 for cls, values in metrics.classes.items()}
    floors = {cls: dice[cls] - low for cls, low in gate.class_minimums.items() if cls in dice}
    worst = min(floors, key=floors.__getitem__) if floors else None
    lowest = "none" if worst is None else f"{worst} {floors[worst]:+.3f}"
    classes = " ".join(f"{dice[cls]:.3f}" for cls in dice)
    return f"{head} {merged:>7.4f} {merged - gate.minimum:>+8.4f}  {classes}  {lowest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/drseg-seeds"))
    parser.add_argument("--table-only", action="store_true", help="reread finished runs")
    args = parser.parse_args()
    settings = load_settings(args.config)  # as the runs read it: the file, then DRSEG_*
    gate = settings.gate
    classes = " ".join(f"{c:>5}" for c in settings.model.classes)
    print(f"gate: merged Dice >= {gate.minimum}, floors {gate.class_minimums}")
    print(
        f"seed {'status':<9} {'wall s':>6} {'tune s':>8} {'merged':>7} {'margin':>8}  {classes}  "
        "lowest floor margin"
    )
    for seed in (int(s) for s in args.seeds.split(",")):
        home = (args.work / f"seed{seed}").resolve()
        summary_path = home / "runs" / "latest" / "summary.json"
        if not args.table_only:
            summary_path = run_pipeline(args.config, home, {"DRSEG_SYNTH__SEED": str(seed)})
        if not summary_path.is_file():
            print(f"{seed:>4} no summary.json under {home}")
            continue
        print(seed_row(seed, json.loads(summary_path.read_text()), gate), flush=True)


if __name__ == "__main__":
    main()
