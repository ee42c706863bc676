"""The ingest stage: source folder or s3:// prefix -> validated dataset artifact.

Every record is read, checked and resized in a pool of processes; a record that fails a
check goes to the quarantine report with the file, the problem and the fix, whole: a
photograph whose mask was rejected goes with it, since it would otherwise train as
lesion-free for that class. The stage fails when fewer than `min_records` valid records
remain, and when a labelled source holds no lesion mask at all (a misnamed mask folder).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from drseg import atomic
from drseg.config import LESION_CLASSES, IngestSettings, StorageSettings
from drseg.data import dataset
from drseg.data.dataset import Manifest, MaskEntry, RecordEntry, Split
from drseg.data.layouts import (
    Layout,
    Listing,
    Skipped,
    SourceRecord,
    detect_layout,
    mask_folders,
    read_layout,
)
from drseg.data.storage import Storage, open_storage
from drseg.data.validation import (
    MASK_REJECTED,
    Problem,
    Rejected,
    check_fundus,
    check_mask,
    decode_image,
    decode_mask,
    photograph_with_mask,
    read_header,
)
from drseg.errors import UserError
from drseg.parallel import parallel_map
from drseg.preprocess import fov_mask, resize_image, resize_mask, working_size


class IngestError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class IngestResult:
    manifest: Manifest
    quarantined: list[Problem]
    skipped: list[Skipped]
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Task:
    storage: Storage
    record: SourceRecord
    settings: IngestSettings
    root: Path


def _with_photograph(record: SourceRecord, storage: Storage, found: list[Problem]) -> list[Problem]:
    """The problems of a record's masks, plus the line that takes its photograph out."""
    return [*found, photograph_with_mask(record.id, storage.describe(record.image), found[0].fix)]


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
        image = resize_image(decoded.rgb, size)
        fov = fov_mask(image)
        check_fundus(fov, (header.width, header.height), record.id, location)
    except Rejected as exc:
        return [exc.problem]

    masks: dict[str, tuple[str, bytes, Any]] = {}
    problems: list[Problem] = []
    for cls, key in sorted(record.masks.items()):
        mask_location = storage.describe(key)
        try:
            mask_bytes = storage.read_bytes(key)
            mask = decode_mask(
                mask_bytes,
                record.id,
                mask_location,
                (header.width, header.height),
                settings.max_pixels,
            )
            small = resize_mask(mask, size)
            check_mask(small, fov, cls, record.id, mask_location)
            masks[cls] = (mask_location, mask_bytes, small)
        except Rejected as exc:
            problems.append(exc.problem)
    if problems:
        return _with_photograph(record, storage, problems)

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


def _require_masks(
    listing: Listing,
    layout: Layout,
    classes: tuple[str, ...],
    url: str,
    keys: list[str],
    chosen: str,
) -> None:
    """A labelled layout in which not one lesion mask was found is a misread source (a
    misnamed mask folder), never "lesion-free photographs": refuse it, saying where we looked."""
    if layout == "unlabelled":
        return
    lesions = [c for c in classes if c in LESION_CLASSES] or list(classes)
    if any(c in r.masks for r in listing.records for c in lesions):
        return
    if listing.rejected_masks:
        return  # mask files exist but were refused: the quarantine report says why
    folders = sorted({PurePosixPath(k).parts[0] + "/" for k in keys if "/" in k})
    raise IngestError(
        f"{url}: no lesion mask found in a labelled source (layout {layout}, {chosen}); "
        f"looked for {', '.join(mask_folders(layout, tuple(lesions)))}; the source's top "
        f"folders are {', '.join(folders) or '(none)'}. Put the masks there (e.g. rename the "
        "mask folder to masks/), or pass --layout unlabelled if the source has no labels"
    )


def ingest(
    source: str | Path,
    out: Path,
    settings: IngestSettings,
    storage_settings: StorageSettings | None = None,
) -> IngestResult:
    storage = open_storage(source, storage_settings)
    keys = storage.list_files()
    layout = detect_layout(keys) if settings.layout == "auto" else settings.layout
    chosen = "detected" if settings.layout == "auto" else "set by ingest.layout"
    listing = read_layout(keys, layout, settings.classes)
    _require_masks(listing, layout, settings.classes, storage.url, keys, chosen)
    problems = [replace(p, path=storage.describe(p.path)) for p in listing.problems]
    skipped = [replace(s, path=storage.describe(s.path)) for s in listing.skipped]
    photographs = {storage.describe(k) for k in listing.photographs}
    with atomic.output_dir(out) as root:
        tasks = [_Task(storage, record, settings, root) for record in listing.records]
        entries: list[RecordEntry] = []
        for result in parallel_map(_ingest_record, tasks, settings.workers, "ingest"):
            if isinstance(result, RecordEntry):
                entries.append(result)
            else:
                problems.extend(result)
        quarantined = sorted({p.id for p in problems if p.path in photographs})
        report = json.dumps([asdict(p) for p in problems], indent=2) + "\n"
        atomic.write_text(root / dataset.QUARANTINE, report)
        if len(entries) < settings.min_records:
            # No dataset comes out, but the report does: it says what to fix.
            atomic.write_failure_report(Path(out), {dataset.QUARANTINE: report})
            raise IngestError(
                f"{storage.url}: only {len(entries)} valid records "
                f"(ingest.min_records = {settings.min_records}); "
                f"{len(quarantined)} photographs quarantined:\n"
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
        masks = dataset.class_counts(manifest)
        summary = {
            "stage": "ingest",
            "source": storage.url,
            "layout": layout,
            "dataset_hash": manifest.dataset_hash,
            "records": len(entries),
            "train": sum(e.split == "train" for e in entries),
            "val": sum(e.split == "val" for e in entries),
            "masks": masks,
            "classes_without_masks": (
                [c for c, n in masks.items() if not n] if layout != "unlabelled" else []
            ),
            "converted": sum(bool(e.notes) for e in entries),
            "quarantined": len(quarantined),
            "quarantined_with_masks": len({p.id for p in problems if p.problem == MASK_REJECTED}),
            "problems": len(problems),
            "skipped": [asdict(s) for s in skipped],
        }
        dataset.write_manifest(root, manifest)
        dataset.write_json(root / dataset.SUMMARY, summary)
    return IngestResult(manifest, problems, skipped, summary)


def format_summary(summary: dict[str, Any]) -> str:
    """The ingest summary as a short table for the terminal."""
    skipped = summary["skipped"]
    rows = [
        ("source", summary["source"]),
        ("layout", summary["layout"]),
        ("records", f"{summary['records']} (train {summary['train']}, val {summary['val']})"),
        *((f"masks {cls}", str(n)) for cls, n in summary["masks"].items()),
        *(
            [("no mask at all", ", ".join(summary["classes_without_masks"]))]
            if summary["classes_without_masks"]
            else []
        ),
        ("converted", str(summary["converted"])),
        (
            "quarantined",
            f"{summary['quarantined']} photographs, {summary['quarantined_with_masks']} of them "
            f"for a rejected mask ({summary['problems']} problems in quarantine.json)",
        ),
        ("skipped files", f"{len(skipped)}" + (" (listed in summary.json)" if skipped else "")),
        ("dataset hash", summary["dataset_hash"][:16]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
