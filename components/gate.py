from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def gate(
    evaluation: Input[Artifact],
    config: str,
    pipeline_run_id: str,
    verdict: Output[Artifact],
    report: Output[Markdown],
) -> bool:
    """The evaluation gate: True when every rule passes; the table goes to `report`."""
    from pathlib import Path

    from drseg.config import GateSettings, load_settings
    from drseg.steps import gate_step, read_evaluation

    env = load_settings()
    metrics, champion, no_champion = read_evaluation(Path(evaluation.path))
    outcome = gate_step(
        metrics,
        champion,
        no_champion,
        GateSettings.model_validate_json(config),
        env.tracking,
        env.home,
        pipeline_run_id,
    )
    print(outcome.markdown)
    Path(verdict.path).write_text(outcome.verdict_json)
    verdict.metadata.update({"passed": outcome.passed, "summary": outcome.summary})
    Path(report.path).write_text(outcome.markdown)
    return outcome.passed
