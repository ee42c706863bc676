"""Data verbs: synth, ingest, clahe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drseg.cli.verb import Verbs, add_verb
from drseg.config import Settings, with_options


def _synth(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.synthetic import write_synthetic_dataset

    synth = settings.synth
    ids = write_synthetic_dataset(
        args.out,
        args.n or synth.n,
        synth.seed if args.seed is None else args.seed,
        args.width or synth.width,
        args.layout or synth.layout,
    )
    print(f"wrote {len(ids)} synthetic photographs with masks to {args.out}")


def _ingest(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.ingest import format_summary, ingest

    options = {"layout": args.layout, "working_width": args.width}
    ingest_settings = with_options(settings.ingest, "ingest", options)
    result = ingest(args.source, args.out, ingest_settings, settings.storage)
    print(format_summary(result.summary))
    for problem in result.quarantined:
        print(f"quarantined {problem.path}: {problem.problem} -> {problem.fix}", file=sys.stderr)
    for skipped in result.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    print(f"dataset written to {args.out}")


def _clahe(args: argparse.Namespace, settings: Settings) -> None:
    from drseg.data.enhance import clahe_dataset

    manifest = clahe_dataset(args.dataset, args.out, settings.clahe)
    print(f"{len(manifest.records)} photographs -> {args.out} (hash {manifest.dataset_hash[:16]})")


def add_verbs(verbs: Verbs) -> None:
    synth = add_verb(
        verbs, "synth", _synth, "generate synthetic fundus photographs with exact masks"
    )
    synth.add_argument("--n", type=int, help="number of photographs (default: synth.n)")
    synth.add_argument("--seed", type=int, help="random seed (default: synth.seed)")
    synth.add_argument("--width", type=int, help="image width in pixels (default: synth.width)")
    synth.add_argument("--layout", choices=["idrid", "generic"], help="folder layout to write")
    synth.add_argument("--out", type=Path, required=True, help="output folder")

    ingest = add_verb(
        verbs, "ingest", _ingest, "validate, resize and split a source into a dataset"
    )
    ingest.add_argument("--source", required=True, help="folder or s3://bucket/prefix")
    ingest.add_argument("--out", type=Path, required=True, help="new dataset folder")
    ingest.add_argument(
        "--layout", choices=["auto", "idrid", "generic", "unlabelled"], help="source layout"
    )
    ingest.add_argument("--width", type=int, help="working width (default: ingest.working_width)")

    clahe = add_verb(verbs, "clahe", _clahe, "CLAHE inside the field of view of every photograph")
    clahe.add_argument("--dataset", type=Path, required=True, help="dataset folder (from ingest)")
    clahe.add_argument("--out", type=Path, required=True, help="new dataset folder")
