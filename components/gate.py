from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def gate(
    evaluation: Input[Artifact],
    config: str,
    registry_config: str,
    pipeline_run_id: str,
    verdict: Output[Artifact],
    report: Output[Markdown],
) -> bool:
    """The evaluation gate: True when every rule passes; the table goes to `report`."""
    from pathlib import Path

    from drseg.config import GateSettings, RegistrySettings, load_settings
    from drseg.steps import gate_step

    env = load_settings()
    outcome = gate_step(
        Path(evaluation.path),
        GateSettings.model_validate_json(config),
        RegistrySettings.model_validate_json(registry_config),
        env.tracking,
        env.home,
        pipeline_run_id,
    )
    print(outcome.markdown)
    Path(verdict.path).write_text(outcome.verdict_json)
    verdict.metadata.update({"passed": outcome.passed, "summary": outcome.summary})
    Path(report.path).write_text(outcome.markdown)
    return outcome.passed
