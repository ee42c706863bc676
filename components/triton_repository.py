from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def triton_repository(
    onnx: Input[Model],
    engine: Input[Model],
    version: int,
    config: str,
    repository: Output[Artifact],
) -> str:
    """A Triton model repository holding registry `version`; returns the served format."""
    from pathlib import Path

    from drseg.config import ServeSettings
    from drseg.steps import repository_step

    written = repository_step(
        Path(onnx.path),
        Path(engine.path),
        version,
        Path(repository.path),
        ServeSettings.model_validate_json(config),
    )
    repository.metadata.update(written)
    return str(written["served_format"])
