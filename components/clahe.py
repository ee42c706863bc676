from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def clahe(
    dataset: Input[Dataset],
    dataset_hash: str,
    clip_limit: float,
    tile_grid: int,
    enhanced: Output[Dataset],
) -> str:
    """CLAHE inside the field of view; `dataset_hash` is here so caching keys on content."""
    from pathlib import Path

    from drseg.config import ClaheSettings
    from drseg.data.enhance import clahe_dataset

    settings = ClaheSettings(clip_limit=clip_limit, tile_grid=tile_grid)
    manifest = clahe_dataset(Path(dataset.path), Path(enhanced.path), settings)
    if manifest.parent_hash != dataset_hash:
        raise ValueError(f"{dataset.path}: hash {manifest.parent_hash} != {dataset_hash}")
    enhanced.metadata.update({"dataset_hash": manifest.dataset_hash, "parent": dataset_hash})
    return manifest.dataset_hash
