"""Images per second for ingest + CLAHE of IDRiD, next to a bare loop (the floor).

The floor does the least work that produces the same arrays: OpenCV decodes the
photograph and its masks at full size, resizes them to the working width and applies
CLAHE, with no validation and no writes. It runs both ways: one process, and one process
per core like our stages. Ours is `ingest` then `clahe_dataset`, exactly as the pipeline
runs them, writing the two datasets to a temporary folder. A photograph-only floor (no
masks) is printed too, for scale.

    python bench/ingest_clahe.py [--idrid DIR] [--widths 1024 2048] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2

from drseg.config import ClaheSettings, IngestSettings
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest
from drseg.data.layouts import SourceRecord, read_idrid
from drseg.data.storage import LocalStorage

DEFAULT_IDRID = Path(__file__).resolve().parents[2] / "shared" / "data" / "idrid"
Job = tuple[str, list[str], int, bool]
"""Photograph path, mask paths, working width, whether to read the masks."""


def bare(job: Job) -> int:
    """imread + resize + CLAHE for one photograph (and its masks when asked)."""
    image_path, mask_paths, width, with_masks = job
    cv2.setNumThreads(1)
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    size = (width, round(image.shape[0] * width / image.shape[1]))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_BGR2LAB)
    lab[:, :, 0] = cv2.createCLAHE(2.0, (8, 8)).apply(lab[:, :, 0])
    out = cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)
    total = int(out[0, 0, 0])
    if with_masks:
        for mask_path in mask_paths:
            mask = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)
            total += int(cv2.resize(mask, size, interpolation=cv2.INTER_AREA)[0, 0])
    return total


def jobs(records: list[SourceRecord], storage: LocalStorage, width: int, masks: bool) -> list[Job]:
    return [
        (storage.describe(r.image), [storage.describe(k) for k in r.masks.values()], width, masks)
        for r in records
    ]


def time_bare(jobs: list[Job], workers: int) -> float:
    started = time.perf_counter()
    if workers == 1:
        for job in jobs:
            bare(job)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) as pool:
            list(pool.map(bare, jobs))
    return time.perf_counter() - started


def time_ours(idrid: Path, width: int, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        ingest(idrid, Path(tmp) / "ingested", IngestSettings(working_width=width, workers=workers))
        middle = time.perf_counter()
        clahe_dataset(Path(tmp) / "ingested", Path(tmp) / "clahe", ClaheSettings(workers=workers))
        return middle - started, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idrid", type=Path, default=DEFAULT_IDRID, help="IDRiD folder")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    storage = LocalStorage(args.idrid)
    records = read_idrid(storage.list_files(), ("MA", "HE", "EX", "SE", "OD")).records
    n = len(records)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{n} IDRiD photographs 4288x2848 + {sum(len(r.masks) for r in records)} masks; "
        f"workers {args.workers}"
    )
    print(f"{'width':>5} {'what':<34} {'s total':>8} {'ms/img':>8} {'img/s':>7} {'vs floor':>9}")
    for width in args.widths:
        floor_1 = time_bare(jobs(records, storage, width, True), 1)
        floor_n = time_bare(jobs(records, storage, width, True), args.workers)
        photo_n = time_bare(jobs(records, storage, width, False), args.workers)
        ingest_s, clahe_s = time_ours(args.idrid, width, args.workers)
        ours = ingest_s + clahe_s
        rows = [
            ("floor: photo+masks, 1 process", floor_1),
            (f"floor: photo+masks, {args.workers} processes", floor_n),
            (f"floor: photo only, {args.workers} processes", photo_n),
            (f"ours: ingest ({ingest_s:.1f} s) + clahe ({clahe_s:.1f} s)", ours),
        ]
        for name, seconds in rows:
            print(
                f"{width:>5} {name:<34} {seconds:>8.1f} {1000 * seconds / n:>8.0f} "
                f"{n / seconds:>7.2f} {seconds / floor_n:>8.2f}x"
            )


if __name__ == "__main__":
    main()
