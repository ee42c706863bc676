"""Training checkpoints kept in the object store as they are written.

KFP uploads a step's outputs only when the step finishes, so the checkpoints of a pod that
is lost mid-training (node drained, pre-empted, OOM-killed) are lost with it. Here every
save of the last checkpoint is also put at <uri>/last.ckpt, and a step run again (KFP's
retry, or a resubmitted run) fetches it before training and resumes. One object,
overwritten at each save: an S3 put is atomic, so a reader gets the previous checkpoint or
the new one, never half of one.

drseg.data.storage (boto3) is imported only when a store is used: training without one
runs where boto3 is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pytorch_lightning.plugins import TorchCheckpointIO

from drseg import atomic
from drseg.config import StorageSettings, TrainingRunSettings

REMOTE_NAME = "last.ckpt"

_Settings = TypeVar("_Settings", bound=TrainingRunSettings)


def for_run(settings: _Settings, key: str) -> _Settings:
    """`settings` with checkpoint_uri narrowed to <checkpoint_uri>/<key>, the run's own
    prefix, so a retry resumes its own checkpoint and another run starts afresh;
    unchanged when checkpoint_uri is not set."""
    if settings.checkpoint_uri is None:
        return settings
    uri = f"{settings.checkpoint_uri.rstrip('/')}/{key}"
    return settings.model_copy(update={"checkpoint_uri": uri})


@dataclass(frozen=True)
class RemoteCheckpoint:
    """The last checkpoint of one training run at <uri>/last.ckpt."""

    uri: str
    storage: StorageSettings | None = None

    def fetch(self, local: Path) -> bool:
        """Download it to `local` (atomically); False when the store has none yet."""
        from drseg.data.storage import open_storage

        store = open_storage(self.uri, self.storage)
        if REMOTE_NAME not in store.stamps():
            return False
        atomic.write_bytes(local, store.read_bytes(REMOTE_NAME))
        return True

    def put(self, local: Path) -> None:
        from drseg.data.storage import open_storage

        open_storage(self.uri, self.storage).write_bytes(REMOTE_NAME, local.read_bytes())


class UploadingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, which then also puts each save of the file named
    `name` (the last checkpoint) in the store. Lightning writes on rank 0 only, so one
    process uploads."""

    def __init__(self, remote: RemoteCheckpoint, name: str) -> None:
        super().__init__()
        self.remote = remote
        self.name = name

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if Path(path).name == self.name:
            self.remote.put(Path(path))
