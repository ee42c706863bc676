"""The MLflow model registry workflow: a gated model becomes @challenger, is promoted to
@champion (the old one becomes @previous), and can be rolled back.

Everything goes through an ``MlflowClient``, so nothing here changes mlflow's process-wide
state, except for the span of the one call that creates a version (`_create_version`:
MLflow's SQL registry store reads the process-wide tracking URI there). Models are addressed
by version number or by alias, never by "latest", which moves under a reader's feet; aliases
are lowercase. ``download`` fetches a model by alias through
the client; ``model_uri`` is for mlflow's own loaders, which resolve ``models:/`` URIs
through the process-wide tracking URI.

MLflow keeps only where an alias points now. Every move is therefore also recorded as an
event: one registered-model tag per action, ``drseg.alias_event.<sequence>.<random>``, holding
JSON ``{"seq", "at", "action", "reason", "moves": [{"alias", "from", "to"}]}``. One tag per
event, not one growing JSON list, because the SQL stores keep a registered-model tag value
in a VARCHAR(5000) column (PostgreSQL enforces it); the random suffix keeps both events when
two processes move aliases at the same moment.

Rollback: @champion goes back to @previous and @previous is cleared. A second rollback is
refused instead of flipping back to the version just rolled away from; to go further back,
promote a version by number.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.onnx
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from onnx import helper

from drseg.artifacts import ONNX_FILE
from drseg.config import SIZE_MULTIPLE
from drseg.errors import UserError
from drseg.evaluate.schema import Metrics
from drseg.gate import GateVerdict, verdict_markdown, verdict_summary
from drseg.tracking import TAG_DATASET_HASH, TAG_GIT_COMMIT, TAG_PIPELINE_RUN_ID

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
TAG_EVAL_DATASET_HASH = "drseg.eval_dataset_hash"
"""Content hash of the dataset the version's metrics were computed on."""
TAG_METRICS = "drseg.metrics"
"""The version's metrics.json without its notes, as JSON: the SQL stores keep a tag value in
a VARCHAR(5000) column, which the notes alone come close to; the whole file is the
version's evaluation/metrics.json."""
TAG_GATE = "drseg.gate"
"""One-line gate verdict."""
EVENT_TAG_PREFIX = "drseg.alias_event."
"""Where mlflow.onnx puts the graph inside the logged model."""
CHECKPOINT_DIR = "checkpoint"
EVALUATION_DIR = "evaluation"
_REASON_LIMIT = 1000
"""Characters of a reason kept in an event, well inside the 5000 of a tag value."""
_ALIAS = re.compile(r"[a-z][a-z0-9_-]*")


class RegistryError(UserError, RuntimeError):
    """A registry operation cannot be done as asked; the message names the model and the fix."""


@dataclass(frozen=True)
class AliasMove:
    """One alias moving from one version to another (None: the alias was unset)."""

    seq: int
    at: str
    """ISO 8601, UTC."""
    action: str
    """register, promote or rollback."""
    alias: str
    from_version: str | None
    to_version: str | None
    reason: str


def _client(client: MlflowClient | str) -> MlflowClient:
    """A URI serves as both tracking and registry URI (MLFLOW_REGISTRY_URI would otherwise
    send versions elsewhere than the logged models they come from)."""
    if isinstance(client, str):
        return MlflowClient(tracking_uri=client, registry_uri=client)
    return client


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "'@/"):
        raise ValueError(
            f"registered model name {name!r} cannot be used in a models:/<name>@<alias> URI; "
            "pick a non-empty name without ', @ or /"
        )


def _check_alias(alias: str) -> None:
    if not _ALIAS.fullmatch(alias) or alias == "latest":
        raise ValueError(
            f"alias {alias!r}: aliases are lowercase letters, digits, _ and -, and not "
            f"'latest'; use {CHAMPION!r}, {CHALLENGER!r} or {PREVIOUS!r}"
        )


def model_uri(name: str, alias: str) -> str:
    """The URI models:/<name>@<alias>, for mlflow's loaders (mlflow.onnx.load_model, pyfunc).

    mlflow resolves such a URI through the process-wide tracking URI (MLFLOW_TRACKING_URI),
    whatever client made it; `download` resolves through a given client instead.
    """
    _check_name(name)
    _check_alias(alias)
    return f"models:/{name}@{alias}"


def _find(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _registered(client: MlflowClient, name: str) -> RegisteredModel:
    model = _find(client, name)
    if model is None:
        raise RegistryError(
            f"no registered model {name!r} at {client.tracking_uri}; register a version first "
            "(drseg.registry.register_model) or check tracking.uri"
        )
    return model


def _aliases(model: RegisteredModel) -> dict[str, str]:
    """alias -> version, versions as strings (MLflow hands out ints or strings by store)."""
    return {alias: str(version) for alias, version in model.aliases.items()}


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of `name`, oldest first."""
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """The READY version `version` of `name`, or a RegistryError listing the versions there are."""
    try:
        found = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        existing = ", ".join(str(v.version) for v in _versions(client, name)) or "none"
        raise RegistryError(
            f"registered model {name!r} has no version {version} (it has: {existing}); pass "
            "one of those, or register a new one"
        ) from exc
    if found.status != "READY":
        raise RegistryError(
            f"{name} version {version} is {found.status}, not READY ({found.status_message}); "
            "register the model again"
        )
    return found


def _record(
    client: MlflowClient,
    model: RegisteredModel,
    action: str,
    moves: list[tuple[str, str | None, str | None]],
    reason: str | None,
) -> None:
    """Append one event of (alias, from, to) moves; `model` as read before the moves."""
    seq = max((event["seq"] for event in _events(model)), default=0) + 1
    reason = (reason or "")[:_REASON_LIMIT]
    event = {
        "seq": seq,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "action": action,
        "reason": reason,
        "moves": [{"alias": alias, "from": old, "to": new} for alias, old, new in moves],
    }
    key = f"{EVENT_TAG_PREFIX}{seq:06d}.{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(model.name, key, json.dumps(event))


def _events(model: RegisteredModel) -> list[dict[str, Any]]:
    """The recorded events of `model`, in the order they happened."""
    tags = sorted(key for key in model.tags if key.startswith(EVENT_TAG_PREFIX))
    events = [json.loads(model.tags[key]) for key in tags]
    return sorted(events, key=lambda event: (event["seq"], event["at"]))


def alias_history(client: MlflowClient | str, name: str) -> list[AliasMove]:
    """Every alias move of `name` since drseg started recording them, oldest first."""
    model = _registered(_client(client), name)
    return [
        AliasMove(
            seq=event["seq"],
            at=event["at"],
            action=event["action"],
            alias=move["alias"],
            from_version=move["from"],
            to_version=move["to"],
            reason=event["reason"],
        )
        for event in _events(model)
        for move in event["moves"]
    ]


def download(client: MlflowClient | str, name: str, alias: str, dst: Path) -> tuple[str, Path]:
    """(version, local folder) of `name`@`alias`: model.onnx, MLmodel, checkpoint/ and
    evaluation/, downloaded into `dst` through this client's tracking URI."""
    client = _client(client)
    _check_alias(alias)
    aliases = _aliases(_registered(client, name))
    if alias not in aliases:
        raise RegistryError(
            f"{name} has no @{alias} (its aliases: {', '.join(sorted(aliases)) or 'none'}); "
            f"register a version (sets @{CHALLENGER}) or promote one (sets @{CHAMPION})"
        )
    number = aliases[alias]
    source = client.get_model_version_download_uri(name, number)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dst), tracking_uri=client.tracking_uri
    )
    return number, Path(local)


def version_number(client: MlflowClient | str, name: str, version_or_alias: str) -> str:
    """The READY version that `version_or_alias` names: a number, or an alias of `name`."""
    client = _client(client)
    if version_or_alias.isdigit():
        _version(client, name, version_or_alias)
        return version_or_alias
    _check_alias(version_or_alias)
    aliases = _aliases(_registered(client, name))
    if version_or_alias not in aliases:
        raise RegistryError(
            f"{name} has no @{version_or_alias} (its aliases: "
            f"{', '.join(sorted(aliases)) or 'none'}); pass one of those or a version number"
        )
    number = aliases[version_or_alias]
    _version(client, name, number)
    return number


def download_onnx(client: MlflowClient | str, name: str, version: int | str, dst: Path) -> Path:
    """model.onnx of `version` alone, downloaded into `dst`: it carries the serving contract,
    and the rest of the version (the checkpoint above all) is not needed to serve it."""
    client = _client(client)
    number = _version_number(version)
    _registered(client, name)
    _version(client, name, number)
    source = client.get_model_version_download_uri(name, number).rstrip("/")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{source}/{ONNX_FILE}", dst_path=str(dst), tracking_uri=client.tracking_uri
    )
    return Path(local)


def _load_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX file to register; export the model first")
    try:
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph)
    except (DecodeError, onnx.checker.ValidationError) as exc:
        raise ValueError(
            f"{path}: not a valid ONNX model ({exc}); register the file the export step wrote"
        ) from exc
    return graph


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """A graph input or output as MLflow sees it; a named (dynamic) dimension is -1."""
    tensor = value.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(helper.tensor_dtype_to_np_dtype(tensor.elem_type), shape, value.name)


def _signature(graph: onnx.ModelProto) -> tuple[ModelSignature, dict[str, np.ndarray]]:
    """(signature, input example) read off the graph itself, so they hold for what is served.

    The example is the smallest input the graph takes: batch 1 and every other dynamic side
    SIZE_MULTIPLE, all zeros (for drseg's graph: a photograph of the training mean colour,
    as normalised). It shows the layout; a real photograph is any size the contract allows.
    """
    weights = {init.name for init in graph.graph.initializer}
    inputs: list[ColSpec | TensorSpec] = [
        _tensor_spec(v) for v in graph.graph.input if v.name not in weights
    ]
    outputs: list[ColSpec | TensorSpec] = [_tensor_spec(v) for v in graph.graph.output]
    example = {
        spec.name: np.zeros(
            [n if n > 0 else (1 if i == 0 else SIZE_MULTIPLE) for i, n in enumerate(spec.shape)],
            spec.type,
        )
        for spec in inputs
        if isinstance(spec, TensorSpec) and spec.name is not None
    }
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs)), example


def _write_model(
    local: Path,
    graph: onnx.ModelProto,
    checkpoint: Path,
    metrics: Metrics,
    verdict: GateVerdict,
    model_id: str,
    run_id: str,
) -> None:
    """An MLflow ONNX model folder (mlflow.onnx and pyfunc load it; signature and input
    example from the graph) plus checkpoint/ and evaluation/. Requirements are given, not
    inferred: inference imports the model in a subprocess, which takes seconds and depends
    on the machine registering it."""
    signature, example = _signature(graph)
    mlflow.onnx.save_model(
        graph,
        str(local),
        mlflow_model=Model(run_id=run_id, model_id=model_id),
        signature=signature,
        input_example=example,
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        save_as_external_data=False,
    )
    if checkpoint.is_dir():
        shutil.copytree(checkpoint, local / CHECKPOINT_DIR)
    else:
        (local / CHECKPOINT_DIR).mkdir()
        shutil.copy2(checkpoint, local / CHECKPOINT_DIR / checkpoint.name)
    evaluation = local / EVALUATION_DIR
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(metrics.to_json())
    (evaluation / "gate.md").write_text(verdict_markdown(verdict))


def _ensure_registered(client: MlflowClient, name: str) -> None:
    if _find(client, name) is not None:
        return
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        # Another pipeline created it between our lookup and our create.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _create_version(
    client: MlflowClient, name: str, model_id: str, run_id: str, tags: dict[str, str]
) -> ModelVersion:
    """A version whose source is models:/<model id>, as mlflow.register_model makes it: that
    source is the link from a version to its logged model that MLflow's UI and loaders follow
    (the SQL registry stores of MLflow 3.17 keep no model_id column, so ModelVersion.model_id
    reads None there whatever is passed). Such a store resolves the source through the
    process-wide tracking URI, hence this client's URI for the duration of the call."""
    with _use_tracking_uri(client.tracking_uri):
        return client.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
        )


def version_of_pipeline_run(
    client: MlflowClient | str, name: str, pipeline_run_id: str
) -> str | None:
    """The version of `name` that pipeline run `pipeline_run_id` registered, if any, with
    @challenger pointed at it again if a failure came between the two: what a retried
    register step (KFP retries registry writes) returns instead of a second version."""
    client = _client(client)
    query = f"name = '{name}' and tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}'"
    found = client.search_model_versions(query)
    if not found:
        return None
    number = str(min(int(version.version) for version in found))
    model = client.get_registered_model(name)
    previous = _aliases(model).get(CHALLENGER)
    if previous != number:
        client.set_registered_model_alias(name, CHALLENGER, number)
        _record(client, model, "register", [(CHALLENGER, previous, number)], None)
    return number


def linked_model_id(version: ModelVersion) -> str | None:
    """The logged model a version was registered from: its model_id where the store keeps
    one, else the id in its models:/<model id> source; None for a version made otherwise."""
    if version.model_id:
        return str(version.model_id)
    prefix = "models:/m-"
    source = str(version.source or "")
    return source.removeprefix("models:/") if source.startswith(prefix) else None


def register_model(
    client: MlflowClient | str,
    name: str,
    onnx_path: Path,
    checkpoint: Path,
    *,
    run_id: str,
    dataset_hash: str,
    metrics: Metrics,
    verdict: GateVerdict,
    git_commit: str,
    pipeline_run_id: str,
) -> str:
    """Log the model and register it as a new version of `name` with alias @challenger.

    The logged model (in the experiment of `run_id`, linked to that run) holds model.onnx
    with an MLmodel file, the checkpoint (a file, or a folder logged whole) under
    checkpoint/, and metrics.json and the gate table under evaluation/. The version is tagged
    with its lineage and metrics; a model whose gate failed is refused. Returns the version.
    """
    client = _client(client)
    _check_name(name)
    if not verdict.passed:
        raise RegistryError(
            f"{name}: the evaluation gate failed ({verdict_summary(verdict)}); a model that "
            "fails the gate is not registered: improve it or change the gate settings"
        )
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint to register; train the model first")
    graph = _load_onnx(onnx_path)
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
    except MlflowException as exc:
        raise RegistryError(
            f"no MLflow run {run_id!r} at {client.tracking_uri} ({exc.message}); pass the run "
            "id of this pipeline's register stage"
        ) from exc

    tags = {
        TAG_DATASET_HASH: dataset_hash,
        TAG_EVAL_DATASET_HASH: metrics.dataset_hash,
        TAG_GIT_COMMIT: git_commit,
        TAG_PIPELINE_RUN_ID: pipeline_run_id,
        TAG_GATE: verdict_summary(verdict),
        TAG_METRICS: metrics.model_copy(update={"notes": ()}).model_dump_json(),
    }
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="onnx"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="drseg-register-") as tmp:
            local = Path(tmp) / "model"
            _write_model(local, graph, checkpoint, metrics, verdict, logged.model_id, run_id)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")

    _ensure_registered(client, name)
    version = _create_version(client, name, logged.model_id, run_id, tags)
    number = str(version.version)
    # What mlflow.register_model does too: the logged model lists its registered versions.
    versions = [{"name": name, "version": version.version}]
    client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    model = client.get_registered_model(name)
    client.set_registered_model_alias(name, CHALLENGER, number)
    _record(
        client, model, "register", [(CHALLENGER, _aliases(model).get(CHALLENGER), number)], None
    )
    return number


def _version_number(version: int | str) -> str:
    text = str(version)
    if not text.isdigit():
        raise RegistryError(f"version {version!r} is not a version number; pass one such as 3")
    return text


def promote(
    client: MlflowClient | str, name: str, version: int | str, *, reason: str | None = None
) -> None:
    """Make `version` @champion; the old champion becomes @previous.

    @challenger is cleared when it pointed at `version` (it is no longer a challenger).
    Promoting the current champion changes and records nothing, so a retried step is safe.
    """
    number = _version_number(version)
    client = _client(client)
    model = _registered(client, name)
    _version(client, name, number)
    aliases = _aliases(model)
    old = aliases.get(CHAMPION)
    if old == number:
        return
    moves: list[tuple[str, str | None, str | None]] = []
    # @previous first: a crash before @champion moves then leaves both on the old champion,
    # never @champion on the new version with @previous still on an older one.
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
        moves.append((PREVIOUS, aliases.get(PREVIOUS), old))
    client.set_registered_model_alias(name, CHAMPION, number)
    moves.append((CHAMPION, old, number))
    if aliases.get(CHALLENGER) == number:
        client.delete_registered_model_alias(name, CHALLENGER)
        moves.append((CHALLENGER, number, None))
    _record(client, model, "promote", moves, reason)


def rollback(client: MlflowClient | str, name: str, *, reason: str | None = None) -> str:
    """Move @champion back to @previous and clear @previous; returns the new champion."""
    client = _client(client)
    model = _registered(client, name)
    aliases = _aliases(model)
    target = aliases.get(PREVIOUS)
    if target is None:
        existing = ", ".join(str(v.version) for v in _versions(client, name))
        raise RegistryError(
            f"{name} has no @{PREVIOUS} version to roll back to (@{CHAMPION} is "
            f"{aliases.get(CHAMPION, 'unset')}); promote a version by number instead "
            f"(versions: {existing})"
        )
    old = aliases.get(CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, target)
    client.delete_registered_model_alias(name, PREVIOUS)
    _record(client, model, "rollback", [(CHAMPION, old, target), (PREVIOUS, target, None)], reason)
    return target


def champion_version(client: MlflowClient | str, name: str) -> str | None:
    """The version @champion points at; None when there is no such model or alias."""
    client = _client(client)
    model = _find(client, name)
    return None if model is None else _aliases(model).get(CHAMPION)


def _utc(millis: int | None) -> str:
    if millis is None:
        return "n/a"
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _merged_dice(tags: dict[str, str]) -> str:
    try:
        dice = Metrics.from_json(tags.get(TAG_METRICS, ""), TAG_METRICS).merged.dice
    except ValueError:  # registered by an older drseg: its metrics are not this schema
        return "n/a"
    return "n/a" if dice is None else f"{dice:.3f}"


def _row(cells: tuple[str, ...]) -> str:
    """A Markdown table row; a | inside a cell (a reason, say) would end the cell."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def show(client: MlflowClient | str, name: str) -> str:
    """Versions with their aliases and lineage tags, then the alias history, as Markdown."""
    client = _client(client)
    aliases: dict[str, list[str]] = {}
    for alias, number in sorted(_aliases(_registered(client, name)).items()):
        aliases.setdefault(number, []).append(alias)
    lines = [
        f"# Registered model `{name}`",
        "",
        "| version | aliases | created (UTC) | merged Dice | gate | dataset | commit | "
        "pipeline run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for version in _versions(client, name):
        tags = version.tags
        cells = (
            str(version.version),
            ", ".join(aliases.get(str(version.version), [])) or "-",
            _utc(version.creation_timestamp),
            _merged_dice(tags),
            tags.get(TAG_GATE, "n/a"),
            tags.get(TAG_DATASET_HASH, "n/a")[:19],
            tags.get(TAG_GIT_COMMIT, "n/a")[:12],
            tags.get(TAG_PIPELINE_RUN_ID, "n/a"),
        )
        lines.append(_row(cells))
    lines += [
        "",
        "## Alias history",
        "",
        "| # | when (UTC) | action | alias | from | to | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for move in alias_history(client, name):
        moved = (
            str(move.seq),
            move.at,
            move.action,
            move.alias,
            move.from_version or "-",
            move.to_version or "-",
            move.reason or "-",
        )
        lines.append(_row(moved))
    return "\n".join(lines) + "\n"
