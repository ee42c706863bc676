"""MLflow's @champion follows the cluster: it moves when, and only when, the Rollout has
made a version stable, and any difference between the two is reported."""

from __future__ import annotations

from dataclasses import dataclass

from drseg import registry
from drseg.deploy.argo import RolloutStatus


@dataclass(frozen=True)
class ChampionLink:
    champion: str | None
    stable: str | None

    @property
    def drift(self) -> str | None:
        """Why @champion and stable differ, or None."""
        if self.stable is None or self.champion == self.stable:
            return None
        return (
            f"@champion is {self.champion or 'unset'} but stable serves version {self.stable}: "
            "`drseg rollout promote` moves @champion once the Rollout is fully promoted"
        )


def champion_version(tracking_uri: str, model_name: str) -> str | None:
    from mlflow import MlflowClient

    aliases = MlflowClient(tracking_uri).get_registered_model(model_name).aliases
    version = aliases.get(registry.CHAMPION)
    return None if version is None else str(version)


def follow(tracking_uri: str, model_name: str, status: RolloutStatus) -> ChampionLink:
    """Move @champion to the version the Rollout made stable; nothing while a canary is
    under way or was aborted (registry.promote keeps @previous and records the move)."""
    if status.promoted and status.stable_version is not None:
        registry.promote(
            tracking_uri,
            model_name,
            status.stable_version,
            reason=f"the Argo Rollout made version {status.stable_version} stable",
        )
    return ChampionLink(champion_version(tracking_uri, model_name), status.stable_version)
