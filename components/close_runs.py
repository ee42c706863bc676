from kfp import dsl

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def close_runs(pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus) -> None:
    """The pipeline's exit handler: after a failed or cancelled run, its MLflow runs still
    open end FAILED or KILLED and the pipeline's run names the failed step; after success
    nothing changes (drseg.tracking.close_pipeline_runs)."""
    from drseg.config import load_settings
    from drseg.tracking import close_pipeline_runs

    env = load_settings()
    ended = close_pipeline_runs(
        env.tracking, env.home, pipeline_run_id, status.state, status.error_message
    )
    print(f"pipeline {status.state}: ended MLflow runs {ended or 'none'}")
