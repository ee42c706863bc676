from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import TENSORRT_IMAGE


@dsl.component(base_image=TENSORRT_IMAGE, install_kfp_package=False)
def tensorrt(
    onnx: Input[Model], dataset: Input[Dataset], config: str, engine: Output[Model]
) -> str:
    """TensorRT engine (FP16, profile from the working width) where TensorRT and a GPU
    exist, kept only if its masks agree with the graph's on the validation photographs;
    returns the served format, "tensorrt_plan" or "onnx" (with the reason logged)."""
    from pathlib import Path

    from drseg.config import ExportSettings
    from drseg.steps import engine_step

    built = engine_step(
        Path(onnx.path),
        Path(dataset.path),
        Path(engine.path),
        ExportSettings.model_validate_json(config),
    )
    print(built["reason"])
    engine.metadata.update(built)
    return str(built["served_format"])
