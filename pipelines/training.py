"""The retraining pipeline. Parameter defaults come from drseg.config, the one source of truth."""

from components.clahe import clahe
from components.ingest import ingest
from kfp import dsl

from drseg.config import ClaheSettings, IngestSettings

_INGEST = IngestSettings()
_CLAHE = ClaheSettings()


@dsl.pipeline(name="drseg-training", description="Fundus lesion segmentation retraining")
def training(
    source: str,
    layout: str = _INGEST.layout,
    working_width: int = _INGEST.working_width,
    classes: list = list(_INGEST.classes),  # noqa: B006 (KFP reads the default, never mutates it)
    val_fraction: float = _INGEST.val_fraction,
    split_seed: int = _INGEST.split_seed,
    min_records: int = _INGEST.min_records,
    clip_limit: float = _CLAHE.clip_limit,
    tile_grid: int = _CLAHE.tile_grid,
) -> None:
    ingested = ingest(
        source=source,
        layout=layout,
        working_width=working_width,
        classes=classes,
        val_fraction=val_fraction,
        split_seed=split_seed,
        min_records=min_records,
    ).set_display_name("ingest")
    clahe(
        dataset=ingested.outputs["dataset"],
        dataset_hash=ingested.outputs["Output"],
        clip_limit=clip_limit,
        tile_grid=tile_grid,
    ).set_display_name("clahe")
