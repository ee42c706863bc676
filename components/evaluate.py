from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    config: str,
    pipeline_run_id: str,
    metrics: Output[Metrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
) -> float:
    """Tiled inference and IDRiD-style metrics on the validation split; returns merged Dice."""
    import shutil
    from pathlib import Path

    from drseg.config import EvaluateSettings, load_settings
    from drseg.steps import evaluate_step

    env = load_settings()
    outcome = evaluate_step(
        Path(model.path),
        Path(dataset.path),
        Path(evaluation.path),
        EvaluateSettings.model_validate_json(config),
        env.tracking,
        env.home,
        pipeline_run_id,
    )
    for name, value in outcome.scalars.items():
        metrics.log_metric(name, value)
    shutil.copyfile(outcome.report, report.path)
    return float(outcome.metrics["merged"]["dice"])
