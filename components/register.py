from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def register(
    onnx: Input[Model],
    model: Input[Model],
    evaluation: Input[Artifact],
    verdict: Input[Artifact],
    registry_config: str,
    pipeline_run_id: str,
) -> int:
    """A new MLflow registry version with alias @challenger; returns the version number."""
    from pathlib import Path

    from drseg.config import RegistrySettings, load_settings
    from drseg.steps import register_step

    env = load_settings()
    registered = register_step(
        Path(onnx.path),
        Path(model.path),
        Path(evaluation.path),
        Path(verdict.path).read_text(),
        RegistrySettings.model_validate_json(registry_config),
        env.tracking,
        env.home,
        pipeline_run_id,
    )
    print(f"registered {registered['model_name']} version {registered['version']} @challenger")
    return int(registered["version"])
