"""Training images per second: our fine-tune stage next to a plain PyTorch loop.

Both train the same MultiTaskUNet with the same loss, batch and patch size, in the same
run. The plain loop feeds pre-made tensors (no sampling, no augmentation, no Lightning);
ours runs `drseg.train.finetune.finetune` on a synthetic dataset, exactly as the stage
does. Reconstruction runs from the clean patch in both, so the work per step is the same.
The first step of each is a warm-up and is not counted.

    python bench/train_throughput.py [--encoder resnet34] [--patch 512] [--batch 4] [--steps 6]
        [--decoder-channels 64,32,16,16,8] [--precision auto|32-true|bf16-mixed]

`make run`'s CPU model: --encoder mobilenet_v2 --decoder-channels 64,32,16,16,8 --patch 160
--batch 6.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from drseg.config import ClaheSettings, FinetuneSettings, IngestSettings, ModelSettings
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.synthetic import write_synthetic_dataset
from drseg.models.unet import build_model
from drseg.train.finetune import finetune, resolve_precision
from drseg.train.losses import multitask_loss


def plain_loop(model_settings: ModelSettings, settings: FinetuneSettings, steps: int) -> float:
    """Images/s of a hand-written loop on resident tensors: forward (the clean batch and, for a
    corrupted reconstruction input, its masked copy, as the stage does), loss, backward, AdamW
    step; channels-last, bf16 autocast where the stage would use it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(model_settings).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    size, batch = settings.patch_size, settings.batch_size
    images = torch.randn(batch, 3, size, size, device=device)
    masks = (
        torch.rand(batch, len(model_settings.classes), size, size, device=device) > 0.99
    ).float()
    corrupted = model.reconstruction_head is not None and settings.reconstruction_input != "clean"
    inputs = torch.cat([images, images * (torch.rand_like(images) > 0.25)]) if corrupted else images
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    bf16 = resolve_precision(settings.precision) == "bf16-mixed"
    started = 0.0
    for step in range(steps + 1):
        if step == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits, reconstruction = model(inputs)
            loss = multitask_loss(
                logits[:batch],
                masks,
                settings.class_weights,
                reconstruction=None if reconstruction is None else reconstruction[-batch:],
                reconstruction_target=images,
                reconstruction_weight=model_settings.reconstruction_weight,
                reconstruction_kind=settings.reconstruction_loss,
            ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def our_stage(model_settings: ModelSettings, settings: FinetuneSettings, steps: int) -> float:
    """Images/s of the fine-tune stage (warm-up step excluded by timing two runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root / "src", n=6, seed=0, width=1024)
        ingest(root / "src", root / "ds", IngestSettings(working_width=1024, val_fraction=0.0))
        clahe_dataset(root / "ds", root / "eq", ClaheSettings())
        warm = settings.model_copy(update={"max_steps": 1})
        first = finetune(root / "eq", root / "m1", model_settings, warm)
        full = settings.model_copy(update={"max_steps": steps + 1})
        run = finetune(root / "eq", root / "m2", model_settings, full)
        return steps * settings.batch_size / (run.seconds - first.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--decoder-channels",
        type=lambda text: tuple(int(width) for width in text.split(",")),
        default=ModelSettings().decoder_channels,
        help="five decoder widths, comma-separated (default: smp's)",
    )
    parser.add_argument("--precision", choices=("auto", "32-true", "bf16-mixed"), default="auto")
    args = parser.parse_args()
    model_settings = ModelSettings(encoder=args.encoder, decoder_channels=args.decoder_channels)
    settings = FinetuneSettings(
        patch_size=args.patch,
        batch_size=args.batch,
        precision=args.precision,
        reconstruction_input="clean",
        checkpoint_every=10_000,
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; {args.encoder}, "
        f"decoder {args.decoder_channels}, {resolve_precision(args.precision)}, "
        f"batch {args.batch} x {args.patch}x{args.patch}, {args.steps} timed steps"
    )
    plain = plain_loop(model_settings, settings, args.steps)
    ours = our_stage(model_settings, settings, args.steps)
    print(f"plain PyTorch loop   {plain:7.2f} img/s")
    print(f"drseg finetune stage {ours:7.2f} img/s")
    print(f"overhead             {100 * (plain / ours - 1):+6.1f} %  (target <= +15 %)")


if __name__ == "__main__":
    main()
