from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def clahe(
    dataset: Input[Dataset], dataset_hash: str, config: str, enhanced: Output[Dataset]
) -> str:
    """CLAHE inside the field of view; `dataset_hash` is here so caching keys on content."""
    from pathlib import Path

    from drseg.config import ClaheSettings
    from drseg.data.enhance import clahe_dataset

    settings = ClaheSettings.model_validate_json(config)
    manifest = clahe_dataset(Path(dataset.path), Path(enhanced.path), settings)
    enhanced.metadata.update({"dataset_hash": manifest.dataset_hash, "parent": dataset_hash})
    return manifest.dataset_hash
