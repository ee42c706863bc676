from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def finetune(
    dataset: Input[Dataset],
    dataset_hash: str,
    encoder: Input[Model],
    model_config: str,
    config: str,
    pipeline_run_id: str,
    model: Output[Model],
) -> str:
    """Multi-task U-Net fine-tuning (segmentation + reconstruction) from the pretrained
    encoder (random weights when pretraining was off); returns the MLflow run id."""
    from pathlib import Path

    from drseg.config import FinetuneSettings, ModelSettings, load_settings
    from drseg.steps import finetune_step, pretrained_encoder

    env = load_settings()
    figures = finetune_step(
        Path(dataset.path),
        Path(model.path),
        ModelSettings.model_validate_json(model_config),
        FinetuneSettings.model_validate_json(config),
        env.tracking,
        env.home,
        pipeline_run_id,
        pretrained_encoder(Path(encoder.path)),
        env.storage,
    )
    model.metadata.update({**figures, "dataset_hash": dataset_hash})
    return str(figures["mlflow_run_id"])
