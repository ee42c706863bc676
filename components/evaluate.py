from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def evaluate(
    onnx: Input[Model],
    dataset: Input[Dataset],
    config: str,
    registry_config: str,
    pipeline_run_id: str,
    metrics: Output[Metrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
    served: Output[Model],
) -> float:
    """The exported graph scored as served on the validation split (cross-fitted
    thresholds), and @champion's graph on the same photographs; `served` is the graph with
    the tuned thresholds in its contract. For the run's page in the KFP UI: per-class
    metrics in `metrics`, the report with its PR curves and overlays inline in `report`.
    Returns the merged Dice (-1 when undefined)."""
    from pathlib import Path

    from drseg.config import EvaluateSettings, RegistrySettings, load_settings
    from drseg.evaluate.embedded import embedded_report
    from drseg.steps import evaluate_step

    env = load_settings()
    outcome = evaluate_step(
        Path(onnx.path),
        Path(dataset.path),
        Path(evaluation.path),
        Path(served.path),
        EvaluateSettings.model_validate_json(config),
        RegistrySettings.model_validate_json(registry_config),
        env.tracking,
        env.home,
        pipeline_run_id,
    )
    for name, value in outcome.metrics.scalars().items():
        metrics.log_metric(name, value)
    Path(report.path).write_text(embedded_report(outcome.report))
    merged = outcome.metrics.merged.dice
    return -1.0 if merged is None else merged
