"""Where a fine-tune step's time goes on a GPU: the plain loop of bench/train_throughput.py
under variants (cuDNN autotuning, reconstruction from a masked copy or the clean patch,
batch size), and the CUDA kernels that take the most time in one profiled step.

    python bench/train_step_variants.py [--encoder resnet34] [--patch 512] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drseg.config import FinetuneSettings, ModelSettings
from train_throughput import plain_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = ModelSettings(encoder=args.encoder)
    print("| batch | reconstruction input | cudnn.benchmark | img/s |\n|---|---|---|---|")
    for batch, recon, benchmark in [
        (16, "masked", False),
        (16, "masked", True),
        (16, "clean", False),
        (16, "clean", True),
        (32, "masked", True),
    ]:
        torch.backends.cudnn.benchmark = benchmark
        settings = FinetuneSettings(
            patch_size=args.patch,
            batch_size=batch,
            reconstruction_input=recon,  # type: ignore[arg-type]
        )
        rate = plain_loop(model, settings, args.steps)
        print(f"| {batch} | {recon} | {benchmark} | {rate:.1f} |", flush=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        settings = FinetuneSettings(patch_size=args.patch, batch_size=16)
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            plain_loop(model, settings, 3)
        print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
