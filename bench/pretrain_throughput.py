"""SimCLR views per second: our pretrain stage next to a plain PyTorch loop.

Both train the same encoder + projection head with NT-Xent, with the same batch (two views
per photograph) and crop size, in the same run. The plain loop feeds pre-made tensors (no
placement, no rendering, no Lightning); ours runs `drseg.train.pretrain.pretrain` on a
synthetic dataset, exactly as the stage does. The first step of each is a warm-up and is
not counted.

    python bench/pretrain_throughput.py [--encoder resnet34] [--crop 256] [--batch 64] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from drseg.config import ClaheSettings, IngestSettings, ModelSettings, PretrainSettings
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.models.unet import build_model
from drseg.train.finetune import resolve_precision
from drseg.train.losses import nt_xent
from drseg.train.pretrain import embed, pretrain, projection_head


def plain_loop(model_settings: ModelSettings, settings: PretrainSettings, steps: int) -> float:
    """Views/s of a hand-written loop: forward, NT-Xent, backward, AdamW step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = build_model(model_settings).encoder.to(device, memory_format=torch.channels_last)
    projection = projection_head(encoder.out_channels[-1], settings.projection_dim).to(device)
    encoder.train()
    projection.train()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *projection.parameters()], lr=settings.lr)
    size, batch = settings.crop_size, settings.batch_size
    views = torch.randn(2 * batch, 3, size, size, device=device)
    views = views.contiguous(memory_format=torch.channels_last)
    bf16 = resolve_precision(settings.precision) == "bf16-mixed"
    started = 0.0
    for step in range(steps + 1):
        if step == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            z = embed(encoder, projection, views)
            loss = nt_xent(z[:batch], z[batch:], settings.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * 2 * batch / (time.perf_counter() - started)


def our_stage(model_settings: ModelSettings, settings: PretrainSettings, steps: int) -> float:
    """Views/s of the pretrain stage (warm-up step excluded by timing two runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root / "src", n=6, seed=0, width=1024)
        ingest(root / "src", root / "ds", IngestSettings(working_width=1024, val_fraction=0.0))
        clahe_dataset(root / "ds", root / "eq", ClaheSettings())
        warm = settings.model_copy(update={"max_steps": 1})
        first = pretrain([root / "eq"], root / "p1", model_settings, warm)
        full = settings.model_copy(update={"max_steps": steps + 1})
        run = pretrain([root / "eq"], root / "p2", model_settings, full)
        return steps * 2 * settings.batch_size / (run.seconds - first.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="photographs per step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    args = parser.parse_args()
    model_settings = ModelSettings(encoder=args.encoder)
    settings = PretrainSettings(
        crop_size=args.crop,
        batch_size=args.batch,
        num_workers=args.workers,
        checkpoint_every=10_000,
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; {args.encoder}, "
        f"batch {args.batch} x 2 views x {args.crop}x{args.crop}, {args.steps} timed steps, "
        f"{args.workers} workers"
    )
    plain = plain_loop(model_settings, settings, args.steps)
    ours = our_stage(model_settings, settings, args.steps)
    print(f"plain PyTorch loop    {plain:8.2f} views/s")
    print(f"drseg pretrain stage  {ours:8.2f} views/s")
    print(f"overhead              {100 * (plain / ours - 1):+6.1f} %  (target <= +15 %)")


if __name__ == "__main__":
    main()
