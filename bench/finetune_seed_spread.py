"""Spread of the fine-tune test's exudate AUPR over seeds (tests/train/test_finetune.py).

Trains the test's 36-step EX-only recipe on the same six 256-px synthetic photographs once per
seed and prints the EX AUPR on the training photographs, as the test computes it. The
test's stated floor is half the lowest figure measured here (bench/RESULTS.md).

    .venv/bin/python bench/finetune_seed_spread.py --lr 1e-3 --seeds 0,1,2,3,4 [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from drseg.config import ClaheSettings, IngestSettings
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.models.unet import load_trained_model
from drseg.train.finetune import finetune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*: the test's recipe
from tests.train.test_finetune import MODEL, SETTINGS, training_aupr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_synthetic_dataset(work / "source", n=6, seed=7, width=256, layout="generic")
        ingest(work / "source", work / "ingested", IngestSettings(working_width=256, workers=1))
        clahe_dataset(work / "ingested", work / "clahe", ClaheSettings(workers=1))
        for seed in (int(s) for s in args.seeds.split(",")):
            settings = SETTINGS.model_copy(update={"lr": args.lr, "seed": seed})
            started = time.perf_counter()
            result = finetune(work / "clahe", work / f"seed{seed}", MODEL, settings)
            aupr = training_aupr(work / "clahe", load_trained_model(result.weights, MODEL))["EX"]
            print(
                f"lr {args.lr:g}, threads {torch.get_num_threads()}, seed {seed}: "
                f"EX AUPR {aupr:.3f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
