"""Training verbs: run (the whole pipeline), pretrain, finetune."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from drseg.cli.verb import Verbs, add_verb, pipeline_run_id
from drseg.config import Settings
from drseg.errors import UserError


def _pretrain(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import pretrain_step

    figures = pretrain_step(
        args.pool,
        args.labelled,
        args.out,
        settings.model,
        # Naming a labelled folder is asking for it (pretrain.include_labelled).
        settings.pretrain.model_copy(
            update={"enabled": True, "include_labelled": args.labelled is not None}
        ),
        settings.tracking,
        settings.home,
        pipeline_run_id(),
        settings.storage,
    )
    print(
        f"{figures['steps']} steps, final loss {figures['final_loss']:.4f}, "
        f"{figures['images_per_second']:.1f} views/s; encoder in {figures['encoder']}"
    )


def _finetune(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.steps import finetune_step, pretrained_encoder

    figures = finetune_step(
        args.dataset,
        args.out,
        settings.model,
        settings.finetune,
        settings.tracking,
        settings.home,
        pipeline_run_id(),
        None if args.encoder is None else pretrained_encoder(args.encoder),
        settings.storage,
    )
    print(
        f"{figures['steps']} steps, final loss {figures['final_loss']:.4f}, "
        f"{figures['images_per_second']:.1f} img/s; model in {args.out}"
    )


def _run(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.run import RunError, format_run_summary, run_pipeline

    try:
        run = run_pipeline(settings, args.source, args.pool, verbose=args.verbose)
    except RunError as exc:
        raise UserError(str(exc)) from exc
    summary = json.loads((run / "summary.json").read_text())
    print(format_run_summary(summary, run))
    if summary["status"] == "failed":
        raise SystemExit(1)


def add_verbs(verbs: Verbs) -> None:
    run = add_verb(
        verbs, "run", _run, "run the whole pipeline locally (kfp.local); synthetic data by default"
    )
    run.add_argument(
        "--source", help="folder or s3:// prefix to train on instead of synthetic data"
    )
    run.add_argument(
        "--pool", help="folder or s3:// prefix of unlabelled photographs to pretrain on"
    )
    run.add_argument("--verbose", action="store_true", help="stream every task's log")

    pretrain = add_verb(
        verbs, "pretrain", _pretrain, "SimCLR pretraining of the encoder on photographs"
    )
    pretrain.add_argument(
        "--pool", type=Path, nargs="+", required=True, help="dataset folder(s) (clahe), unlabelled"
    )
    pretrain.add_argument(
        "--labelled",
        type=Path,
        help="labelled dataset folder (clahe) whose train split joins the pool, without labels",
    )
    pretrain.add_argument("--out", type=Path, required=True, help="output folder; rerun to resume")

    finetune = add_verb(
        verbs, "finetune", _finetune, "train the multi-task U-Net on a dataset's train split"
    )
    finetune.add_argument("--dataset", type=Path, required=True, help="dataset folder (clahe)")
    finetune.add_argument(
        "--out", type=Path, required=True, help="model folder; rerun to resume from it"
    )
    finetune.add_argument(
        "--encoder", type=Path, help="pretrain output folder to start from (default: random)"
    )
