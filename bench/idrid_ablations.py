"""What pretraining, the reconstruction head and CLAHE are each worth, on IDRiD.

One fixed validation split of the 54 IDRiD training photographs (ingest.val_fraction 0.2,
split_seed 0: 11 photographs, stratified by lesion classes); every arm fine-tunes for the
same number of steps with the same batch, then is scored on that split with cross-fitted
thresholds, as the evaluate stage scores (but by tiled PyTorch inference on the arm's own
dataset, so that the no-CLAHE arm can be scored at all). Arms:

    base        random init, reconstruction head (weight 0.1, masked input), CLAHE
    base-seed1  the same with seed 1: the spread between two seeds is the noise floor
    simclr      base, encoder from SimCLR on the unlabelled pool + the train split
    no-recon    base without the reconstruction head
    no-clahe    base on photographs without CLAHE

Results go to <work>/results.json after each arm (a rerun skips finished arms) and are
printed as one table. Sizes are flags so the same script runs CPU-sized or GPU-sized:

    python bench/idrid_ablations.py --idrid ../shared/data/idrid \\
        --pool ../shared/data/idrid-unlabeled --work /tmp/ablations
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drseg.config import (
    ClaheSettings,
    EvaluateSettings,
    FinetuneSettings,
    IngestSettings,
    ModelSettings,
    PretrainSettings,
)
from drseg.data import dataset
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.evaluate.report import evaluate_dataset
from drseg.evaluate.tiling import predict_probabilities
from drseg.models.normalize import image_to_tensor
from drseg.models.unet import load_trained_model
from drseg.train.finetune import finetune

ARMS = ("base", "base-seed1", "simclr", "no-recon", "no-clahe")


class TiledModel:
    """A trained network as an evaluation scorer (drseg.evaluate.report.Scorer): Gaussian
    tiled inference on the dataset's own photographs (already preprocessed), thresholded
    inside the dataset's field of view."""

    def __init__(
        self,
        network: torch.nn.Module,
        classes: tuple[str, ...],
        root: Path,
        tile: int,
        device: str,
    ) -> None:
        self.network, self.classes, self.root = network, classes, root
        self.tile, self.device = tile, device

    def probabilities(self, photograph: Path) -> tuple[np.ndarray, np.ndarray]:
        rgb = dataset.read_rgb(photograph)
        probs = predict_probabilities(
            lambda batch: self.network(batch)[0],
            image_to_tensor(rgb),
            self.tile,
            0.5,
            4,
            False,
            self.device,
        ).numpy()
        return probs, dataset.read_mask(dataset.fov_path(self.root, photograph.stem))

    def masks(
        self, probabilities: np.ndarray, fov: np.ndarray, thresholds: dict[str, float]
    ) -> np.ndarray:
        edges = np.array([thresholds[c] for c in self.classes])[:, None, None]
        return np.asarray((probabilities >= edges) & fov[None])


def _prepare(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """Ingest (and CLAHE) the labelled set and the pool once; reused by every arm."""
    folders = {
        "raw": work / "idrid-raw",
        "clahe": work / "idrid-clahe",
        "pool-raw": work / "pool-raw",
        "pool": work / "pool-clahe",
    }
    labelled = IngestSettings(working_width=args.width, val_fraction=0.2, split_seed=0)
    if not folders["raw"].exists():
        ingest(args.idrid, folders["raw"], labelled)
    if not folders["clahe"].exists():
        clahe_dataset(folders["raw"], folders["clahe"], ClaheSettings())
    pool = IngestSettings(working_width=args.width, layout="unlabelled", val_fraction=0.0)
    if not folders["pool-raw"].exists():
        ingest(args.pool, folders["pool-raw"], pool)
    if not folders["pool"].exists():
        clahe_dataset(folders["pool-raw"], folders["pool"], ClaheSettings())
    return folders


def _settings(args: argparse.Namespace) -> tuple[ModelSettings, FinetuneSettings]:
    model = ModelSettings(encoder=args.encoder, reconstruction_weight=0.1)
    finetune_settings = FinetuneSettings(
        patch_size=args.patch,
        batch_size=args.batch,
        max_steps=args.steps,
        warmup_steps=max(1, args.steps // 20),
        lr=args.lr,
        checkpoint_every=max(1, args.steps // 2),
        num_workers=args.workers,
    )
    return model, finetune_settings


def _run_arm(
    arm: str, args: argparse.Namespace, folders: dict[str, Path], work: Path
) -> dict[str, Any]:
    model, settings = _settings(args)
    data = folders["raw"] if arm == "no-clahe" else folders["clahe"]
    encoder = None
    pretrain_seconds = 0.0
    if arm == "base-seed1":
        settings = settings.model_copy(update={"seed": 1})
    if arm == "no-recon":
        model = model.model_copy(update={"reconstruction_weight": 0.0})
    if arm == "simclr":
        from drseg.train.pretrain import pretrain

        started = time.perf_counter()
        result = pretrain(
            [folders["pool"]],
            work / "pretrain",
            model,
            PretrainSettings(
                crop_size=args.pretrain_crop,
                batch_size=args.pretrain_batch,
                max_steps=args.pretrain_steps,
                warmup_steps=max(1, args.pretrain_steps // 20),
                checkpoint_every=max(1, args.pretrain_steps // 4),
                num_workers=args.workers,
            ),
            labelled_dir=folders["clahe"],
        )
        pretrain_seconds = time.perf_counter() - started
        encoder = result.encoder
    started = time.perf_counter()
    trained = finetune(data, work / arm / "model", model, settings, encoder=encoder)
    train_seconds = time.perf_counter() - started
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network = load_trained_model(trained.weights, model, device)
    scorer = TiledModel(network, model.classes, data, args.tile, device)
    evaluation = evaluate_dataset(
        scorer,
        data,
        work / arm / "evaluation",
        EvaluateSettings(overlays=2),
        f"tiled PyTorch inference, {args.tile} px tiles, no flips",
    )
    classes = {c: m.model_dump() for c, m in evaluation.metrics.classes.items()}
    return {
        "aupr": {c: classes[c]["aupr"] for c in model.classes},
        "dice": {c: classes[c]["dice"] for c in model.classes},
        "merged_dice": evaluation.metrics.merged.dice,
        "finetune_seconds": round(train_seconds, 1),
        "pretrain_seconds": round(pretrain_seconds, 1),
    }


def _cell(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    classes = ("MA", "HE", "EX", "SE")
    header = (
        " | ".join(f"AUPR {c}" for c in classes) + " | " + " | ".join(f"Dice {c}" for c in classes)
    )
    rows = [f"| arm | {header} | any-lesion Dice | fine-tune s |", "|---" * 11 + "|"]
    for arm, r in results.items():
        cells = [_cell(r["aupr"][c]) for c in classes] + [_cell(r["dice"][c]) for c in classes]
        rows.append(
            f"| {arm} | {' | '.join(cells)} | {_cell(r['merged_dice'])} | "
            f"{r['finetune_seconds']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idrid", required=True, help="IDRiD segmentation folder")
    parser.add_argument("--pool", required=True, help="folder of unlabelled photographs")
    parser.add_argument("--work", type=Path, required=True, help="work folder (resumable)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--width", type=int, default=768, help="working width")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--patch", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per arm")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tile", type=int, default=384, help="evaluation tile size")
    parser.add_argument("--pretrain-crop", type=int, default=128)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers")
    args = parser.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}; torch "
        f"{torch.__version__}; {args.encoder}, width {args.width}, {args.steps} steps of "
        f"{args.batch} x {args.patch}px; pretrain {args.pretrain_steps} steps of "
        f"{args.pretrain_batch} x 2 views x {args.pretrain_crop}px"
    )
    folders = _prepare(args, work)
    results_path = work / "results.json"
    results: dict[str, dict[str, Any]] = (
        json.loads(results_path.read_text()) if results_path.is_file() else {}
    )
    for arm in args.arms:
        if arm in results:
            continue
        results[arm] = _run_arm(arm, args, folders, work)
        results_path.write_text(json.dumps(results, indent=2))
        print(format_table({arm: results[arm]}), flush=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
