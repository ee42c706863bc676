"""Readers that turn a listing of source files into records, one per photograph.

Three layouts:
- idrid: IDRiD's own folders, ``A. Segmentation/1. Original Images/<split>/IDRiD_NN.jpg``
  and ``A. Segmentation/2. All Segmentation Groundtruths/<split>/<n. Name>/IDRiD_NN_<CLS>.tif``.
- generic: ``images/<id>.<jpg|jpeg|png|tif|tiff>`` and ``masks/<CLASS>/<id>.<png|tif|tiff>``.
- unlabelled: any folder tree of images (the pretraining pool).

A missing mask means "no lesion of that class in that photograph" (IDRiD's convention), so
a mask file that is there but cannot be used must never look like a missing one: a record
is whole or it is out. Any mask file that is rejected by its name, type or folder takes the
photograph it belongs to into quarantine with it; when the name is too broken to say which
photograph that is for certain, every photograph it could belong to goes. Every file that
is not used is named, with the reason. Readers only look at names; contents are checked later.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from drseg.config import LESION_CLASSES
from drseg.data.validation import IMAGE_SUFFIXES, MASK_SUFFIXES, Problem, photograph_with_mask

Layout = Literal["idrid", "generic", "unlabelled"]

KNOWN_CLASSES: tuple[str, ...] = (*LESION_CLASSES, "OD")
"""Class codes a mask folder or name may carry (the configured ones are added to these)."""

IDRID_IMAGES = "1. Original Images"
IDRID_MASKS = "2. All Segmentation Groundtruths"
IDRID_FOLDERS: dict[str, str] = {
    "MA": "1. Microaneurysms",
    "HE": "2. Haemorrhages",
    "EX": "3. Hard Exudates",
    "SE": "4. Soft Exudates",
    "OD": "5. Optic Disc",
}
"""The class folder of each class in IDRiD's ground truth."""

_IDRID_MASK_NAME = re.compile(r"^(?P<id>.+)_(?P<cls>[A-Z]+)$")


@dataclass(frozen=True)
class SourceRecord:
    id: str
    image: str
    """Key of the photograph, relative to the source root."""
    masks: dict[str, str] = field(default_factory=dict)
    """Class -> key of its mask file, for the classes that have one."""


@dataclass(frozen=True)
class Skipped:
    """A file that is deliberately not read, and why (reported by name, never just counted)."""

    path: str
    reason: str


@dataclass
class Listing:
    records: list[SourceRecord]
    problems: list[Problem]
    skipped: list[Skipped]
    photographs: list[str] = field(default_factory=list)
    """Keys of every photograph found, quarantined ones included."""
    rejected_masks: list[str] = field(default_factory=list)
    """Keys of mask files rejected from their name, type or folder, or pairing with nothing."""


@dataclass(frozen=True)
class _BadMask:
    """A mask file rejected from its name, type or folder; `name` is the id it claims."""

    key: str
    name: str
    problem: str
    fix: str


def detect_layout(keys: list[str]) -> Layout:
    parts = {part for key in keys for part in PurePosixPath(key).parts[:-1]}
    if IDRID_IMAGES in parts:
        return "idrid"
    if any(PurePosixPath(key).parts[0] == "images" for key in keys if "/" in key):
        return "generic"
    return "unlabelled"


def _suffix(key: str) -> str:
    return PurePosixPath(key).suffix.lower()


def _loose(name: str) -> str:
    """A name folded so that case, punctuation and leading zeros do not count."""
    name = re.sub(r"\d+", lambda m: str(int(m.group())), name.lower())
    return re.sub(r"[^a-z0-9]", "", name)


def _candidates(name: str, image_ids: list[str], classes: tuple[str, ...]) -> list[str]:
    """Photographs a broken mask name may belong to: equal once folded, with or without a
    class code at the end."""
    folded = _loose(name)
    endings = ("", *(c.lower() for c in classes))
    return [i for i in image_ids if any(folded == _loose(i) + e for e in endings)]


def _assemble(
    images: dict[str, list[str]],
    masks: dict[str, dict[str, list[str]]],
    bad_masks: list[_BadMask],
    problems: list[Problem],
    skipped: list[Skipped],
    classes: tuple[str, ...],
    elsewhere: dict[str, str] | None = None,
) -> Listing:
    """Pair images with masks. Duplicates, rejected masks and masks that pair with nothing
    become problems; a photograph with any rejected or doubtful mask goes with it.

    `elsewhere` maps ids to photographs that exist but are not read (e.g. nested ones), so
    their masks are reported as such rather than as orphans.
    """
    elsewhere = elsewhere or {}
    image_ids = sorted(images)
    doubtful: dict[str, list[str]] = defaultdict(list)
    """Photograph id -> the reasons it cannot be taken whole."""

    rejected: list[str] = []

    def reject_mask(key: str, name: str, problem: str, fix: str) -> None:
        rejected.append(key)
        if name in images:
            owners = [name]
        else:
            owners = _candidates(name, image_ids, classes)
            if owners:
                problem += f"; it cannot be paired with certainty (photograph {', '.join(owners)}?)"
            else:
                problem += "; it pairs with no photograph"
        if not owners:
            problems.append(Problem(name, key, problem, fix))
        for owner in owners:
            problems.append(Problem(owner, key, problem, fix))
            doubtful[owner].append(fix)

    for bad in bad_masks:
        reject_mask(bad.key, bad.name, bad.problem, bad.fix)
    for record_id in sorted(set(masks) - set(images)):
        for paths in masks[record_id].values():
            for path in paths:
                if record_id in elsewhere:
                    problem = f"mask of {elsewhere[record_id]}, a photograph that is not read"
                    fix = "move the photograph into images/ (see its own line)"
                    problems.append(Problem(record_id, path, problem, fix))
                    continue
                reject_mask(
                    path,
                    record_id,
                    f"mask without image: no photograph with id '{record_id}'",
                    "name it exactly as its photograph (same case and digits), or remove it",
                )
    for record_id in sorted(set(elsewhere) & set(images)):
        problems.append(
            Problem(
                record_id,
                elsewhere[record_id],
                f"id '{record_id}' is also the id of {images[record_id][0]}: "
                "its masks cannot be paired with certainty",
                "rename one of the two photographs",
            )
        )
        doubtful[record_id].append("rename one of the two photographs")

    records: list[SourceRecord] = []
    for record_id in image_ids:
        paths = images[record_id]
        class_masks = masks.get(record_id, {})
        if len(paths) > 1:
            for path in paths + [p for ps in class_masks.values() for p in ps]:
                problems.append(
                    Problem(
                        record_id,
                        path,
                        f"duplicate id '{record_id}': {len(paths)} images share it "
                        f"({', '.join(paths)})",
                        "rename or remove all but one of them",
                    )
                )
            continue
        for cls, ps in sorted(class_masks.items()):
            if len(ps) > 1:
                for path in ps:
                    problems.append(
                        Problem(
                            record_id,
                            path,
                            f"duplicate {cls} masks for '{record_id}' ({', '.join(ps)})",
                            "keep one mask file per class and photograph",
                        )
                    )
                doubtful[record_id].append("keep one mask file per class and photograph")
        if record_id in doubtful:
            problems.append(photograph_with_mask(record_id, paths[0], doubtful[record_id][0]))
            continue
        records.append(SourceRecord(record_id, paths[0], {c: p[0] for c, p in class_masks.items()}))
    photographs = sorted(p for ps in images.values() for p in ps)
    return Listing(records, problems, skipped, photographs, sorted(rejected))


def _known(classes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*KNOWN_CLASSES, *classes)))


def _not_configured(key: str, cls: str) -> Skipped:
    return Skipped(key, f"{cls} masks are not read: {cls} is not in ingest.classes")


def read_idrid(keys: list[str], classes: tuple[str, ...]) -> Listing:
    known = _known(classes)
    folders = {name.lower(): cls for cls, name in IDRID_FOLDERS.items()}
    images: dict[str, list[str]] = defaultdict(list)
    masks: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    bad: list[_BadMask] = []
    skipped: list[Skipped] = []
    for key in keys:
        path = PurePosixPath(key)
        if IDRID_IMAGES in path.parts[:-1]:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images[path.stem].append(key)
            else:
                skipped.append(Skipped(key, f"not a photograph ({path.suffix or 'no suffix'})"))
            continue
        if IDRID_MASKS not in path.parts[:-1]:
            skipped.append(Skipped(key, "outside the IDRiD image and ground-truth folders"))
            continue
        match = _IDRID_MASK_NAME.match(path.stem)
        folder_cls = folders.get(path.parent.name.lower())
        if match is None or match["cls"] not in known:
            bad.append(
                _BadMask(
                    key,
                    path.stem,
                    "mask name does not follow IDRiD_NN_<CLASS>.tif",
                    "rename it exactly as its photograph plus the class code, e.g. IDRiD_01_MA.tif",
                )
            )
        elif path.suffix.lower() not in MASK_SUFFIXES:
            bad.append(
                _BadMask(
                    key,
                    match["id"],
                    f"lossy or unsupported mask type '{path.suffix}'",
                    "export the mask losslessly as TIFF or PNG",
                )
            )
        elif folder_cls != match["cls"]:
            where = (
                f"the folder of {folder_cls}"
                if folder_cls
                else f"not a class folder of IDRiD ({', '.join(IDRID_FOLDERS.values())})"
            )
            bad.append(
                _BadMask(
                    key,
                    match["id"],
                    f"{match['cls']} mask in folder '{path.parent.name}', {where}",
                    f"move it to '{IDRID_FOLDERS.get(match['cls'], match['cls'])}'",
                )
            )
        elif match["cls"] not in classes:
            skipped.append(_not_configured(key, match["cls"]))
        else:
            masks[match["id"]][match["cls"]].append(key)
    return _assemble(images, masks, bad, [], skipped, known)


def read_generic(keys: list[str], classes: tuple[str, ...]) -> Listing:
    known = _known(classes)
    images: dict[str, list[str]] = defaultdict(list)
    masks: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    bad: list[_BadMask] = []
    problems: list[Problem] = []
    skipped: list[Skipped] = []
    nested: dict[str, str] = {}
    for key in keys:
        path = PurePosixPath(key)
        parts = path.parts
        if parts[0] == "images" and len(parts) > 1:
            if _suffix(key) not in IMAGE_SUFFIXES:
                problems.append(
                    Problem(
                        path.stem,
                        key,
                        f"unsupported image type '{_suffix(key)}'",
                        f"convert it to one of {', '.join(IMAGE_SUFFIXES)}",
                    )
                )
            elif len(parts) == 2:
                images[path.stem].append(key)
            else:
                nested[path.stem] = key
                problems.append(
                    Problem(
                        path.stem,
                        key,
                        "photograph in a sub-folder of images/, which is not read "
                        "(the generic layout is images/<id>.<ext>)",
                        "move it into images/ itself (ids must stay unique)",
                    )
                )
        elif parts[0] == "masks" and len(parts) > 1:
            cls = parts[1].upper()
            if len(parts) != 3:
                bad.append(
                    _BadMask(
                        key,
                        path.stem,
                        "mask not in a class folder masks/<CLASS>/",
                        f"move it to masks/<CLASS>/{path.name}, CLASS one of {', '.join(known)}",
                    )
                )
            elif cls not in known:
                bad.append(
                    _BadMask(
                        key,
                        path.stem,
                        f"unknown class folder 'masks/{parts[1]}/'",
                        f"name the folder by its class code: one of {', '.join(known)}",
                    )
                )
            elif _suffix(key) not in MASK_SUFFIXES:
                bad.append(
                    _BadMask(
                        key,
                        path.stem,
                        f"lossy or unsupported mask type '{_suffix(key)}'",
                        "export the mask losslessly as PNG or TIFF",
                    )
                )
            elif cls not in classes:
                skipped.append(_not_configured(key, cls))
            else:
                masks[path.stem][cls].append(key)
        else:
            skipped.append(Skipped(key, "not under images/ or masks/<CLASS>/"))
    return _assemble(images, masks, bad, problems, skipped, known, nested)


def read_unlabelled(keys: list[str]) -> Listing:
    """Every image anywhere in the tree, except in mask folders (a labelled tree given as
    the pool); the id is its path without suffix, '/' -> '__'."""
    images: dict[str, list[str]] = defaultdict(list)
    skipped: list[Skipped] = []
    for key in keys:
        folders = PurePosixPath(key).parts[:-1]
        if IDRID_MASKS in folders or "masks" in (f.lower() for f in folders):
            skipped.append(Skipped(key, "a mask (in a mask folder), not a photograph"))
        elif _suffix(key) in IMAGE_SUFFIXES:
            images[str(PurePosixPath(key).with_suffix("")).replace("/", "__")].append(key)
        else:
            skipped.append(Skipped(key, f"not a photograph ({_suffix(key) or 'no suffix'})"))
    return _assemble(images, {}, [], [], skipped, ())


def read_layout(keys: list[str], layout: Layout, classes: tuple[str, ...]) -> Listing:
    if layout == "idrid":
        return read_idrid(keys, classes)
    if layout == "generic":
        return read_generic(keys, classes)
    return read_unlabelled(keys)


def mask_folders(layout: Layout, classes: tuple[str, ...]) -> list[str]:
    """Where a layout looks for the masks of `classes`, for error messages."""
    if layout == "idrid":
        return [
            f"A. Segmentation/{IDRID_MASKS}/<split>/{IDRID_FOLDERS.get(c, c)}/<id>_{c}.tif"
            for c in classes
        ]
    if layout == "generic":
        return [f"masks/{c}/<id>.png" for c in classes]
    return []
