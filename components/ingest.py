from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def ingest(
    source: str,
    layout: str,
    working_width: int,
    classes: list,
    val_fraction: float,
    split_seed: int,
    min_records: int,
    dataset: Output[Dataset],
    report: Output[Markdown],
) -> str:
    """Validate and resize a source (folder or s3://) into a dataset; returns its hash."""
    from pathlib import Path

    from drseg.config import IngestSettings, load_settings
    from drseg.data.ingest import format_summary, ingest

    settings = IngestSettings(
        layout=layout,
        working_width=working_width,
        classes=tuple(classes),
        val_fraction=val_fraction,
        split_seed=split_seed,
        min_records=min_records,
    )
    result = ingest(source, Path(dataset.path), settings, load_settings().storage)
    print(format_summary(result.summary))
    dataset.metadata.update(result.summary)
    Path(report.path).write_text(f"```\n{format_summary(result.summary)}\n```\n")
    return result.manifest.dataset_hash
