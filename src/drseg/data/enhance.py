"""The CLAHE stage: dataset -> dataset with contrast-equalised photographs.

Masks and fields of view are carried over unchanged (hard links where the filesystem
allows, copies otherwise); the new hash derives from the input hash and the parameters.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from drseg import atomic
from drseg.config import ClaheSettings
from drseg.data import dataset
from drseg.data.dataset import Manifest
from drseg.parallel import parallel_map
from drseg.preprocess import clahe


@dataclass(frozen=True)
class _Task:
    src: Path
    dst: Path
    record_id: str
    masks: tuple[str, ...]
    settings: ClaheSettings


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _clahe_record(task: _Task) -> None:
    fov_file = dataset.fov_path(task.src, task.record_id)
    fov = dataset.read_mask(fov_file)
    image = dataset.read_rgb(dataset.image_path(task.src, task.record_id))
    out = clahe(image, fov, task.settings.clip_limit, task.settings.tile_grid)
    dataset.write_image(dataset.image_path(task.dst, task.record_id), out)
    _link_or_copy(fov_file, dataset.fov_path(task.dst, task.record_id))
    for cls in task.masks:
        _link_or_copy(
            dataset.mask_path(task.src, cls, task.record_id),
            dataset.mask_path(task.dst, cls, task.record_id),
        )


def clahe_dataset(src: Path, out: Path, settings: ClaheSettings) -> Manifest:
    parent = dataset.load_manifest(src)
    params = {"clip_limit": settings.clip_limit, "tile_grid": settings.tile_grid}
    with atomic.output_dir(out) as root:
        tasks = [_Task(Path(src), root, r.id, tuple(r.masks), settings) for r in parent.records]
        for _ in parallel_map(_clahe_record, tasks, settings.workers, "clahe"):
            pass
        manifest = parent.model_copy(
            update={
                "stage": "clahe",
                "parent_hash": parent.dataset_hash,
                "dataset_hash": dataset.derived_hash(parent.dataset_hash, "clahe", params),
                "params": {**parent.params, "clahe": params},
            }
        )
        dataset.write_manifest(root, manifest)
        dataset.write_json(
            root / dataset.SUMMARY,
            {
                "stage": "clahe",
                "dataset_hash": manifest.dataset_hash,
                "parent_hash": parent.dataset_hash,
                "records": len(manifest.records),
                **params,
            },
        )
    return manifest
