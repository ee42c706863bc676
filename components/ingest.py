from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def ingest(
    source: str,
    source_fingerprint: str,
    config: str,
    dataset: Output[Dataset],
    report: Output[Markdown],
) -> str:
    """Validate and resize a source (folder or s3://) into a dataset; returns its hash.
    `source_fingerprint` is there for KFP's cache key: a changed source is a new key."""
    from pathlib import Path

    from drseg.config import IngestSettings, load_settings
    from drseg.data.ingest import format_summary, ingest

    settings = IngestSettings.model_validate_json(config)
    result = ingest(source, Path(dataset.path), settings, load_settings().storage)
    print(format_summary(result.summary))
    dataset.metadata.update({**result.summary, "source_fingerprint": source_fingerprint})
    Path(report.path).write_text(f"```\n{format_summary(result.summary)}\n```\n")
    return result.manifest.dataset_hash
