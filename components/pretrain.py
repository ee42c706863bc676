from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def pretrain(
    pool: Input[Dataset],
    pool_hash: str,
    model_config: str,
    config: str,
    encoder: Output[Model],
    labelled: Input[Dataset] | None = None,
) -> str:
    """SimCLR pretraining of the U-Net encoder on the unlabelled pool; returns the MLflow
    run id ("" when pretrain.enabled is false and the step does nothing). No pipeline run
    id comes in, so that KFP's cache can reuse the encoder across pipeline runs; the
    labelled dataset comes in only where pretrain.include_labelled built it into the DAG."""
    from pathlib import Path

    from drseg.config import ModelSettings, PretrainSettings, load_settings
    from drseg.steps import pretrain_step

    env = load_settings()
    settings = PretrainSettings.model_validate_json(config)
    if settings.include_labelled and labelled is None:
        raise ValueError(
            "pretrain.include_labelled is true but this pipeline was built without the "
            "labelled input: recompile it with the same settings (`drseg pipeline compile`)"
        )
    figures = pretrain_step(
        [Path(pool.path)],
        None if labelled is None else Path(labelled.path),
        Path(encoder.path),
        ModelSettings.model_validate_json(model_config),
        settings,
        env.tracking,
        env.home,
        storage=env.storage,
    )
    encoder.metadata.update({**figures, "pool_hash": pool_hash})
    return str(figures.get("mlflow_run_id", ""))
