"""`drseg publish`: a version's Triton repository into the object store the Rollout serves.

The Rollout's pods read `rollout.repository_uri` (s3://drseg-models/triton/{version}) with
Triton's own S3 support, so what lies there must be complete before anything points at it.
The files go first under a temporary prefix beside it, are copied from there (each checked
against its sha256) to the final prefix, and the version becomes visible only with the
final marker, PUBLISHED.json, which lists every file and its sha256; `drseg rollout start`
refuses a version without it. Triton ignores the marker (it reads model folders only).
Publishing again is a no-op when the marker lists the same files; a published version is
never overwritten with other ones (register a new version instead). The staged copy stays
behind under the temporary prefix (the storage layer has no delete); it is never served.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from drseg.config import StorageSettings
from drseg.data.storage import Storage, StorageError, open_storage
from drseg.errors import UserError
from drseg.serving.repository import CONFIG_FILE, PLAN_PLATFORM, read_config, versions

MARKER = "PUBLISHED.json"
GPU_KIND = 1
"""model_config_pb2.ModelInstanceGroup.KIND_GPU."""


class PublishError(UserError, RuntimeError):
    """The repository cannot be published as it is; the message says what to fix."""


@dataclass(frozen=True)
class Published:
    uri: str
    files: dict[str, str]
    """Key under the URI -> sha256."""
    already: bool
    """True when the same files were published before: nothing was written."""


def repository_uri(template: str, version: int) -> str:
    return template.format(version=version).rstrip("/")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_files(repository: Path, model_name: str, version: int) -> dict[str, Path]:
    """The files Triton needs to serve `version`: the model's config and its version folder,
    keyed as they lie under the repository root. A plan must be served on a GPU instance."""
    folder = Path(repository) / model_name
    config_path = folder / CONFIG_FILE
    available = versions(Path(repository), model_name) if folder.is_dir() else []
    if version not in available:
        raise PublishError(
            f"{folder}: no version {version} (versions: {available}); write the repository "
            "of this version first (the pipeline's repository step or drseg run)"
        )
    config = read_config(config_path)
    if config.platform == PLAN_PLATFORM and any(g.kind != GPU_KIND for g in config.instance_group):
        raise PublishError(
            f"{config_path}: a TensorRT plan with a non-GPU instance group, which Triton's "
            "TensorRT backend refuses to load (a hand-edited config?); write the repository "
            "again with `drseg repository`, which puts plans on KIND_GPU"
        )
    files = {f"{model_name}/{CONFIG_FILE}": config_path}
    for path in sorted((folder / str(version)).rglob("*")):
        if path.is_file():
            files[path.relative_to(repository).as_posix()] = path
    return files


def published_files(target: Storage) -> dict[str, str] | None:
    """The marker's file list, or None when the version is not published there."""
    try:
        raw = target.read_bytes(MARKER)
    except StorageError as exc:
        cause = exc.__cause__
        code = getattr(cause, "response", {}).get("Error", {}).get("Code")
        if isinstance(cause, FileNotFoundError) or code == "NoSuchKey":
            return None
        raise
    try:
        files: dict[str, str] = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(
            f"{target.describe(MARKER)}: unreadable marker ({exc}); publish the version again "
            "after deleting the marker"
        ) from exc
    return files


def publish(
    repository: Path,
    model_name: str,
    version: int,
    uri_template: str,
    storage_settings: StorageSettings | None = None,
) -> Published:
    """Stage, copy, then mark `version` of the local repository as published."""
    local = version_files(repository, model_name, version)
    payload = {key: path.read_bytes() for key, path in local.items()}
    files = {key: _sha256(data) for key, data in payload.items()}
    uri = repository_uri(uri_template, version)
    target = open_storage(uri, storage_settings)
    found = published_files(target)
    if found == files:
        return Published(uri, files, already=True)
    if found is not None:
        raise PublishError(
            f"{uri}: version {version} is already published with other files; a published "
            "version is never replaced: register the new model as a new version"
        )
    staging = open_storage(f"{uri}.partial-{secrets.token_hex(4)}", storage_settings)
    for key, data in payload.items():
        staging.write_bytes(key, data)
    for key, digest in files.items():
        data = staging.read_bytes(key)
        if _sha256(data) != digest:
            raise PublishError(
                f"{staging.describe(key)}: staged copy differs from {local[key]}; publish again"
            )
        target.write_bytes(key, data)
    marker = {"version": version, "model_name": model_name, "files": files}
    target.write_bytes(MARKER, json.dumps(marker, indent=2, sort_keys=True).encode())
    return Published(uri, files, already=False)
