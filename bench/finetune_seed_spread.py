"""Spread of the fine-tune test's exudate Dice over seeds (tests/train/test_finetune.py).

Trains the test's 36-step EX-only recipe on the same six 256-px synthetic photographs once per
seed and prints the EX Dice at 0.5 on the training photographs, as the test computes it. The
test's stated floor is half the lowest figure measured here (bench/RESULTS.md).

    .venv/bin/python bench/finetune_seed_spread.py --lr 1e-3 --seeds 0,1,2,3,4 [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from drseg.config import ClaheSettings, FinetuneSettings, IngestSettings, ModelSettings
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.models.normalize import image_to_tensor
from drseg.train.finetune import finetune, load_trained_model
from drseg.train.patches import load_train_split

MODEL = ModelSettings(encoder="resnet18", reconstruction_weight=0.0)


def ex_dice(dataset: Path, weights: Path) -> float:
    model = load_trained_model(weights, MODEL)
    data = load_train_split(dataset, MODEL.classes)
    ex = MODEL.classes.index("EX")
    inter = total = 0
    with torch.no_grad():
        for image, masks in zip(data.images, data.masks, strict=True):
            logits, _ = model(image_to_tensor(image)[None])
            predicted = (torch.sigmoid(logits[0, ex]) > 0.5).numpy()
            inter += int(np.count_nonzero(predicted & masks[..., ex]))
            total += int(np.count_nonzero(predicted)) + int(np.count_nonzero(masks[..., ex]))
    return 2 * inter / max(total, 1)


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
            settings = FinetuneSettings(
                patch_size=64,
                batch_size=8,
                max_steps=36,
                lr=args.lr,
                warmup_steps=3,
                schedule="poly",
                foreground_fraction=1.0,
                class_sampling=(0.0, 0.0, 1.0, 0.0),
                class_weights=(0.1, 0.1, 1.0, 0.1),
                checkpoint_every=12,
                num_workers=0,
                precision="32-true",
                seed=seed,
            )
            started = time.perf_counter()
            result = finetune(work / "clahe", work / f"seed{seed}", MODEL, settings)
            dice = ex_dice(work / "clahe", result.weights)
            print(
                f"lr {args.lr:g}, threads {torch.get_num_threads()}, seed {seed}: "
                f"EX Dice {dice:.3f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
