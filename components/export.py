from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def export(
    model: Input[Model],
    dataset: Input[Dataset],
    config: str,
    ingest_config: str,
    clahe_config: str,
    onnx: Output[Model],
) -> float:
    """ONNX with the serving contract, parity-checked; returns the parity max abs diff."""
    from pathlib import Path

    from drseg.config import ClaheSettings, ExportSettings, IngestSettings
    from drseg.steps import export_step

    summary = export_step(
        Path(model.path),
        Path(dataset.path),
        Path(onnx.path),
        ExportSettings.model_validate_json(config),
        IngestSettings.model_validate_json(ingest_config),
        ClaheSettings.model_validate_json(clahe_config),
    )
    onnx.metadata.update({k: v for k, v in summary.items() if k != "parity"})
    return float(summary["parity_max_abs_diff"])
