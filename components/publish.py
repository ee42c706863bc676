from kfp import dsl
from kfp.dsl import Artifact, Input

from components import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def publish(repository: Input[Artifact], version: int, serve_config: str, config: str) -> str:
    """Copy registry `version` of the Triton repository to rollout.repository_uri (staged,
    then marked; a re-run is a no-op); returns the URI the Rollout serves it from. The
    object store's credentials come from the environment."""
    from pathlib import Path

    from drseg.config import RolloutSettings, ServeSettings, load_settings
    from drseg.deploy.publish import publish as publish_version

    settings = RolloutSettings.model_validate_json(config)
    published = publish_version(
        Path(repository.path),
        ServeSettings.model_validate_json(serve_config).model_name,
        version,
        settings.repository_uri,
        load_settings().storage,
    )
    return published.uri
