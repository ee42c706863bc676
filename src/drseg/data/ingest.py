"""The ingest stage: source folder or s3:// prefix -> validated dataset artifact.

Every record is read, checked and resized in a pool of processes; a record that fails a
check goes to the quarantine report with the file, the problem and the fix, and the stage
fails only when fewer than `min_records` valid records remain.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drseg import atomic
from drseg.config import LESION_CLASSES, IngestSettings, StorageSettings
from drseg.data import dataset
from drseg.data.dataset import Manifest, MaskEntry, RecordEntry, Split
from drseg.data.layouts import SourceRecord, detect_layout, read_layout
from drseg.data.storage import Storage, open_storage
from drseg.data.validation import Problem, Rejected, decode_image, decode_mask, read_header
from drseg.parallel import parallel_map
from drseg.preprocess import fov_mask, resize_image, resize_mask, working_size


class IngestError(RuntimeError):
    pass


@dataclass(frozen=True)
class IngestResult:
    manifest: Manifest
    quarantined: list[Problem]
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Task:
    storage: Storage
    record: SourceRecord
    settings: IngestSettings
    root: Path


def _reject(record: SourceRecord, storage: Storage, problem: Problem) -> list[Problem]:
    """The problem, plus a line for the photograph when the problem was in one of its masks."""
    image = storage.describe(record.image)
    if problem.path == image:
        return [problem]
    return [problem, Problem(record.id, image, "photograph quarantined with its mask", problem.fix)]


def _ingest_record(task: _Task) -> RecordEntry | list[Problem]:
    storage, record, settings = task.storage, task.record, task.settings
    location = storage.describe(record.image)
    try:
        nbytes = storage.size(record.image)
        if nbytes > settings.max_file_bytes:
            raise Rejected(
                Problem(
                    record.id,
                    location,
                    f"file is {nbytes / 1e6:.0f} MB, over the limit of "
                    f"{settings.max_file_bytes / 1e6:.0f} MB; refused before decoding",
                    "re-encode it, or raise ingest.max_file_bytes if it is genuine",
                )
            )
        data = storage.read_bytes(record.image)
        header = read_header(data, record.id, location, settings.max_pixels)
        size = working_size(header.width, header.height, settings.working_width)
        decoded = decode_image(data, header, record.id, location, settings.working_width)
        masks: dict[str, tuple[str, bytes, Any]] = {}
        for cls, key in sorted(record.masks.items()):
            mask_bytes = storage.read_bytes(key)
            mask = decode_mask(
                mask_bytes,
                record.id,
                storage.describe(key),
                (header.width, header.height),
                settings.max_pixels,
            )
            masks[cls] = (storage.describe(key), mask_bytes, resize_mask(mask, size))
        image = resize_image(decoded.rgb, size)
        fov = fov_mask(image)
        if fov.mean() < 0.05:
            raise Rejected(
                Problem(
                    record.id,
                    location,
                    "no field of view found (the photograph is almost all black)",
                    "check that this is a colour fundus photograph and that it is not blank",
                )
            )
    except Rejected as exc:
        return _reject(record, storage, exc.problem)

    root = task.root
    dataset.write_image(dataset.image_path(root, record.id), image)
    dataset.write_mask(dataset.fov_path(root, record.id), fov)
    entries: dict[str, MaskEntry] = {}
    for cls, (source, mask_bytes, mask) in masks.items():
        dataset.write_mask(dataset.mask_path(root, cls, record.id), mask)
        entries[cls] = MaskEntry(
            source=source, sha256=dataset.sha256(mask_bytes), pixels=int(mask.sum())
        )
    notes = list(decoded.notes)
    if header.width < settings.working_width:
        notes.append(f"upscaled from width {header.width}")
    return RecordEntry(
        id=record.id,
        source=location,
        sha256=dataset.sha256(data),
        source_size=(header.width, header.height),
        size=size,
        masks=entries,
        split="train",
        notes=tuple(notes),
    )


def assign_splits(
    strata: dict[str, frozenset[str]], val_fraction: float, seed: int
) -> dict[str, Split]:
    """Seeded train/val split, stratified by which lesion classes a photograph has.

    Within a stratum, records are ordered by a hash of (seed, id), so the split of a record
    does not depend on listing order or on other records. Rounding carries over between
    strata so the total validation share stays close to `val_fraction`.
    """
    groups: dict[frozenset[str], list[str]] = defaultdict(list)
    for record_id, classes in strata.items():
        groups[classes].append(record_id)
    splits: dict[str, Split] = {}
    carry = 0.0
    for key in sorted(groups, key=lambda k: (len(k), sorted(k))):
        ids = sorted(groups[key], key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        wanted = len(ids) * val_fraction + carry
        n_val = min(len(ids), math.floor(wanted + 0.5))
        carry = wanted - n_val
        for index, record_id in enumerate(ids):
            splits[record_id] = "val" if index < n_val else "train"
    return splits


def source_fingerprint(source: str | Path, storage_settings: StorageSettings | None = None) -> str:
    """A hash of the source's listing (keys, sizes, mtimes or ETags), read without opening a
    file: it changes whenever a photograph or mask is added, removed or rewritten, so the
    pipeline caches ingest on it instead of re-reading an unchanged source every run."""
    storage = open_storage(source, storage_settings)
    return dataset.content_hash({"source": storage.url, "files": storage.stamps()})


def ingest(
    source: str | Path,
    out: Path,
    settings: IngestSettings,
    storage_settings: StorageSettings | None = None,
) -> IngestResult:
    storage = open_storage(source, storage_settings)
    keys = storage.list_files()
    layout = detect_layout(keys) if settings.layout == "auto" else settings.layout
    listing = read_layout(keys, layout, settings.classes)
    problems = list(listing.problems)
    with atomic.output_dir(out) as root:
        tasks = [_Task(storage, record, settings, root) for record in listing.records]
        entries: list[RecordEntry] = []
        for result in parallel_map(_ingest_record, tasks, settings.workers, "ingest"):
            if isinstance(result, RecordEntry):
                entries.append(result)
            else:
                problems.extend(result)
        quarantined_ids = sorted({p.id for p in problems})
        report = [asdict(p) for p in problems]
        dataset.write_json(root / dataset.QUARANTINE, report)
        if len(entries) < settings.min_records:
            # No dataset comes out, but the report does: it says what to fix.
            dataset.write_json(Path(out) / dataset.QUARANTINE, report)
            raise IngestError(
                f"{storage.url}: only {len(entries)} valid records "
                f"(ingest.min_records = {settings.min_records}); "
                f"{len(quarantined_ids)} quarantined:\n"
                + "\n".join(f"  {p.path}: {p.problem} -> {p.fix}" for p in problems[:20])
            )
        lesions = set(LESION_CLASSES)
        strata = {
            e.id: frozenset(c for c, m in e.masks.items() if c in lesions and m.pixels)
            for e in entries
        }
        splits = assign_splits(strata, settings.val_fraction, settings.split_seed)
        entries = [e.model_copy(update={"split": splits[e.id]}) for e in entries]
        params = {
            "layout": layout,
            "working_width": settings.working_width,
            "classes": list(settings.classes),
            "val_fraction": settings.val_fraction,
            "split_seed": settings.split_seed,
        }
        manifest = Manifest(
            stage="ingest",
            dataset_hash=dataset.ingest_hash(params, entries),
            classes=settings.classes,
            params=params,
            records=tuple(sorted(entries, key=lambda e: e.id)),
        )
        summary = {
            "stage": "ingest",
            "source": storage.url,
            "layout": layout,
            "dataset_hash": manifest.dataset_hash,
            "records": len(entries),
            "train": sum(e.split == "train" for e in entries),
            "val": sum(e.split == "val" for e in entries),
            "masks": dataset.class_counts(manifest),
            "converted": sum(bool(e.notes) for e in entries),
            "quarantined": len(quarantined_ids),
            "ignored_files": len(listing.ignored),
        }
        dataset.write_manifest(root, manifest)
        dataset.write_json(root / dataset.SUMMARY, summary)
    return IngestResult(manifest, problems, summary)


def format_summary(summary: dict[str, Any]) -> str:
    """The ingest summary as a short table for the terminal."""
    rows = [
        ("source", summary["source"]),
        ("layout", summary["layout"]),
        ("records", f"{summary['records']} (train {summary['train']}, val {summary['val']})"),
        *((f"masks {cls}", str(n)) for cls, n in summary["masks"].items()),
        ("converted", str(summary["converted"])),
        ("quarantined", str(summary["quarantined"])),
        ("ignored files", str(summary["ignored_files"])),
        ("dataset hash", summary["dataset_hash"][:16]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
