"""Readers that turn a listing of source files into records, one per photograph.

Three layouts:
- idrid: IDRiD's own folders, ``A. Segmentation/1. Original Images/<split>/IDRiD_NN.jpg``
  and ``A. Segmentation/2. All Segmentation Groundtruths/<split>/<n. Name>/IDRiD_NN_<CLS>.tif``.
- generic: ``images/<id>.<jpg|jpeg|png|tif|tiff>`` and ``masks/<CLASS>/<id>.<png|tif|tiff>``.
- unlabelled: any folder tree of images (the pretraining pool).

A missing mask means "no lesion of that class in that photograph" (IDRiD's convention), so
it is recorded, not rejected. Readers only look at names; file contents are checked later.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from drseg.data.validation import IMAGE_SUFFIXES, MASK_SUFFIXES, Problem

Layout = Literal["idrid", "generic", "unlabelled"]

IDRID_IMAGES = "1. Original Images"
IDRID_MASKS = "2. All Segmentation Groundtruths"
_IDRID_MASK_NAME = re.compile(r"^(?P<id>.+)_(?P<cls>[A-Za-z]+)$")


@dataclass(frozen=True)
class SourceRecord:
    id: str
    image: str
    """Key of the photograph, relative to the source root."""
    masks: dict[str, str] = field(default_factory=dict)
    """Class -> key of its mask file, for the classes that have one."""


@dataclass
class Listing:
    records: list[SourceRecord]
    problems: list[Problem]
    ignored: list[str]
    """Keys that belong to no record (other files, classes not configured), for the report."""


def detect_layout(keys: list[str]) -> Layout:
    parts = {part for key in keys for part in PurePosixPath(key).parts[:-1]}
    if IDRID_IMAGES in parts:
        return "idrid"
    if any(PurePosixPath(key).parts[0] == "images" for key in keys if "/" in key):
        return "generic"
    return "unlabelled"


def _suffix(key: str) -> str:
    return PurePosixPath(key).suffix.lower()


def _assemble(
    images: dict[str, list[str]],
    masks: dict[str, dict[str, list[str]]],
    problems: list[Problem],
    ignored: list[str],
) -> Listing:
    """Pair images with masks; duplicates and orphans become problems, nothing is dropped."""
    records: list[SourceRecord] = []
    for record_id in sorted(images):
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
        duplicate_masks = {cls: ps for cls, ps in class_masks.items() if len(ps) > 1}
        if duplicate_masks:
            for cls, ps in duplicate_masks.items():
                for path in ps:
                    problems.append(
                        Problem(
                            record_id,
                            path,
                            f"duplicate {cls} masks for '{record_id}' ({', '.join(ps)})",
                            "keep one mask file per class and photograph",
                        )
                    )
            problems.append(
                Problem(
                    record_id,
                    paths[0],
                    "photograph quarantined with its ambiguous masks",
                    "keep one mask file per class and photograph",
                )
            )
            continue
        records.append(SourceRecord(record_id, paths[0], {c: p[0] for c, p in class_masks.items()}))
    for record_id in sorted(set(masks) - set(images)):
        for paths in masks[record_id].values():
            for path in paths:
                problems.append(
                    Problem(
                        record_id,
                        path,
                        f"mask without image: no photograph with id '{record_id}'",
                        "add the photograph or remove the mask",
                    )
                )
    return Listing(records, problems, ignored)


def read_idrid(keys: list[str], classes: tuple[str, ...]) -> Listing:
    images: dict[str, list[str]] = defaultdict(list)
    masks: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    problems: list[Problem] = []
    ignored: list[str] = []
    for key in keys:
        path = PurePosixPath(key)
        if IDRID_IMAGES in path.parts[:-1]:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images[path.stem].append(key)
            else:
                ignored.append(key)
        elif IDRID_MASKS in path.parts[:-1]:
            match = _IDRID_MASK_NAME.match(path.stem)
            if match is None or path.suffix.lower() not in MASK_SUFFIXES:
                problems.append(
                    Problem(
                        path.stem,
                        key,
                        "mask name does not follow IDRiD_NN_<CLASS>.tif",
                        "rename it, e.g. IDRiD_01_MA.tif",
                    )
                )
            elif match["cls"].upper() in classes:
                masks[match["id"]][match["cls"].upper()].append(key)
            else:
                ignored.append(key)
        else:
            ignored.append(key)
    return _assemble(images, masks, problems, ignored)


def read_generic(keys: list[str], classes: tuple[str, ...]) -> Listing:
    images: dict[str, list[str]] = defaultdict(list)
    masks: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    problems: list[Problem] = []
    ignored: list[str] = []
    for key in keys:
        parts = PurePosixPath(key).parts
        if len(parts) == 2 and parts[0] == "images":
            if _suffix(key) in IMAGE_SUFFIXES:
                images[PurePosixPath(key).stem].append(key)
            else:
                problems.append(
                    Problem(
                        PurePosixPath(key).stem,
                        key,
                        f"unsupported image type '{_suffix(key)}'",
                        f"convert it to one of {', '.join(IMAGE_SUFFIXES)}",
                    )
                )
        elif len(parts) == 3 and parts[0] == "masks":
            cls = parts[1].upper()
            if cls not in classes:
                ignored.append(key)
            elif _suffix(key) in MASK_SUFFIXES:
                masks[PurePosixPath(key).stem][cls].append(key)
            else:
                problems.append(
                    Problem(
                        PurePosixPath(key).stem,
                        key,
                        f"unsupported mask type '{_suffix(key)}'",
                        "save masks as PNG or TIFF (lossless)",
                    )
                )
        else:
            ignored.append(key)
    return _assemble(images, masks, problems, ignored)


def read_unlabelled(keys: list[str]) -> Listing:
    """Every image anywhere in the tree; the id is its path without suffix, '/' -> '__'."""
    images: dict[str, list[str]] = defaultdict(list)
    ignored: list[str] = []
    for key in keys:
        if _suffix(key) in IMAGE_SUFFIXES:
            images[str(PurePosixPath(key).with_suffix("")).replace("/", "__")].append(key)
        else:
            ignored.append(key)
    return _assemble(images, {}, [], ignored)


def read_layout(keys: list[str], layout: Layout, classes: tuple[str, ...]) -> Listing:
    if layout == "idrid":
        return read_idrid(keys, classes)
    if layout == "generic":
        return read_generic(keys, classes)
    return read_unlabelled(keys)
