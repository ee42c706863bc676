"""MLflow runs for pipeline stages: one run per stage, nested under one run per pipeline run.

Stages of one pipeline run execute in separate processes (kfp.local subprocesses or cluster
pods), so the parent run is found again by its tags rather than passed around. MLflow is
imported lazily: training also runs where only torch and Lightning are installed, and then
records nothing instead of failing.

Everything goes through an ``MlflowClient`` bound to the tracking URI, so nothing here
changes mlflow's process-wide state (tracking URI, active run).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel

from drseg.config import TrackingSettings
from drseg.errors import UserError
from drseg.secrets import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_KIND = "drseg.kind"
TAG_STAGE = "drseg.stage"
TAG_PIPELINE_RUN_ID = "drseg.pipeline_run_id"
TAG_DATASET_HASH = "drseg.dataset_hash"
TAG_GIT_COMMIT = "drseg.git_commit"
TAG_PIPELINE_STATE = "drseg.pipeline_state"
TAG_FAILED_STEP = "drseg.failed_step"
TAG_PIPELINE_ERROR = "drseg.pipeline_error"
CANCELLED_STATES = frozenset({"CANCELLED", "CANCELED", "CANCELLING", "CANCELING"})
"""KFP's final states of a cancelled run (the API and the SDK spell it both ways)."""
OPEN_STATUSES = frozenset({"RUNNING", "SCHEDULED"})
NO_STAGE_RUN = "a step without an MLflow run (fingerprint, ingest, clahe, export, tensorrt, "
NO_STAGE_RUN += "triton-repository, publish): see the KFP run's graph"
SERVER_SCHEMES = ("http", "https")
"""Tracking URIs of an MLflow server: the server, not this process, picks where artifacts go."""

_T = TypeVar("_T")


class TrackingError(UserError, RuntimeError):
    """The tracking backend refused or could not be reached; the message names the URI."""


def tracking_uri(settings: TrackingSettings, home: Path) -> str:
    """settings.uri, or a SQLite file in the workspace (the embedded default)."""
    return settings.uri or f"sqlite:///{(home / 'mlflow.db').resolve()}"


def git_commit(repo: Path | None = None) -> str:
    """The checked-out commit of `repo` (default: this drseg checkout), or "unknown"."""
    where = repo or Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_plain(value: Any) -> Any:
    # mode="json" masks secrets and turns paths and tuples into strings and lists.
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _flat_params(params: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings and settings objects as dotted keys, e.g. "finetune.lr" -> "0.0003"."""
    flat: dict[str, str] = {}
    for key, value in _as_plain(params).items():
        name = f"{prefix}{key}"
        plain = _as_plain(value)
        if isinstance(plain, Mapping) and plain:
            flat.update(_flat_params(plain, f"{name}."))
        else:
            flat[name] = redact(str(plain))
    return flat


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


@dataclass(frozen=True)
class StageRun:
    """One MLflow run for one pipeline stage; a thin typed wrapper others call."""

    client: MlflowClient
    run_id: str

    def log_params(self, params: BaseModel | Mapping[str, Any]) -> None:
        """Flattened to dotted keys; values over MLflow's length limit end in "..."."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        batch = [
            Param(key, _clip(text, MAX_PARAM_VAL_LENGTH))
            for key, text in _flat_params(params).items()
        ]
        for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """None and NaN mean "not computed" (e.g. Dice without a positive pixel): skipped."""
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        values = {key: float(value) for key, value in metrics.items() if value is not None}
        batch = [
            Metric(key, value, now, step or 0)
            for key, value in values.items()
            if not math.isnan(value)
        ]
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a directory kept under its own name (artifact_path/<dir name>/...)."""
        if path.is_dir():
            inside = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self.client.log_artifacts(self.run_id, str(path), inside)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(
                f"{path}: no such file or directory to log as an MLflow artifact of run "
                f"{self.run_id}; write it before logging it"
            )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        batch = [RunTag(key, str(value)) for key, value in tags.items()]
        for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def metric_logger(self) -> Callable[[dict[str, float], int], None]:
        """What a training loop calls with (metrics, step)."""
        return self.log_metrics


@dataclass(frozen=True)
class NullRun:
    """Stands in for StageRun when tracking is off: same methods, nothing recorded."""

    run_id: str = ""

    def log_params(self, params: BaseModel | Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def metric_logger(self) -> Callable[[dict[str, float], int], None]:
        return self.log_metrics


@cache
def _say_tracking_off(reason: str) -> None:
    """Once per reason and process: every stage would otherwise repeat it."""
    print(f"drseg: MLflow tracking is off ({reason}); nothing is recorded", file=sys.stderr)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Another stage created it between our lookup and our create.
        experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} at {redact(client.tracking_uri)} is deleted; restore it "
            "(`mlflow experiments restore`) or set tracking.experiment to another name"
        )
    return str(experiment.experiment_id)


def _parent_run_id(client: MlflowClient, experiment_id: str, pipeline_run_id: str) -> str:
    """The pipeline run's own MLflow run: the oldest one tagged with its id, created if none."""
    tags = {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_KIND: "pipeline"}
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())

    def oldest() -> str | None:
        runs = client.search_runs([experiment_id], query)
        first = min(runs, key=lambda run: (run.info.start_time, run.info.run_id), default=None)
        return None if first is None else str(first.info.run_id)

    found = oldest()
    if found is not None:
        return found
    mine = client.create_run(experiment_id, tags=tags, run_name=f"pipeline {pipeline_run_id}")
    # Two stages may have created one at the same moment: all of them keep the oldest.
    winner = oldest() or mine.info.run_id
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return str(winner)


def _start(
    client: MlflowClient,
    experiment: str,
    artifact_location: str | None,
    stage: str,
    pipeline_run_id: str,
    dataset_hash: str | None,
) -> tuple[str, str]:
    """(parent run id, stage run id); the parent shows RUNNING unless a stage already failed."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

    experiment_id = _experiment_id(client, experiment, artifact_location)
    parent_id = _parent_run_id(client, experiment_id, pipeline_run_id)
    if client.get_run(parent_id).info.status != "FAILED":
        client.update_run(parent_id, status="RUNNING")
    commit = git_commit()
    tags = {
        TAG_KIND: "stage",
        TAG_STAGE: stage,
        TAG_PIPELINE_RUN_ID: pipeline_run_id,
        TAG_GIT_COMMIT: commit,
        MLFLOW_GIT_COMMIT: commit,
        MLFLOW_PARENT_RUN_ID: parent_id,
    }
    if dataset_hash is not None:
        tags[TAG_DATASET_HASH] = dataset_hash
    run = client.create_run(experiment_id, tags=tags, run_name=stage)
    return parent_id, str(run.info.run_id)


def _end(client: MlflowClient, parent_id: str, run_id: str, status: str) -> None:
    """Ends the stage run; the parent follows, except that a failed pipeline stays FAILED."""
    client.set_terminated(run_id, status)
    parent_failed = client.get_run(parent_id).info.status == "FAILED"
    client.set_terminated(parent_id, "FAILED" if parent_failed else status)


def _check_pipeline_run_id(pipeline_run_id: str) -> None:
    if not pipeline_run_id or "'" in pipeline_run_id:
        raise ValueError(
            f"pipeline_run_id {pipeline_run_id!r} cannot tag an MLflow run: pass a non-empty "
            "id without quotes (the pipeline's run id)"
        )


def _artifact_location(uri: str, home: Path) -> str | None:
    """With a database URI, artifacts go to <home>/mlartifacts; a server picks its own."""
    if urlparse(uri).scheme in SERVER_SCHEMES:
        return None
    home.mkdir(parents=True, exist_ok=True)
    return (home / "mlartifacts").resolve().as_uri()


@contextmanager
def _refused_as_tracking_error(uri: str, what: str) -> Iterator[None]:
    """Unreachable or refusing: the message, not the chained traceback, whose frames and
    driver errors may print the URI with its credentials."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, OSError, ImportError, SQLAlchemyError) as exc:
        reason = exc.message if isinstance(exc, MlflowException) else f"{exc}"
        raise TrackingError(
            redact(
                f"MLflow at {uri} could not {what}: {reason}; check tracking.uri "
                "(DRSEG_TRACKING__URI) or set tracking.enabled to false"
            )
        ) from None


@contextmanager
def stage_run(
    settings: TrackingSettings,
    home: Path,
    stage: str,
    *,
    pipeline_run_id: str,
    dataset_hash: str | None = None,
    config: BaseModel | Mapping[str, Any] | None = None,
) -> Iterator[StageRun | NullRun]:
    """An MLflow run for `stage`, nested under the run of pipeline run `pipeline_run_id`.

    Ends FINISHED, or FAILED when the block raises (the exception goes on). Artifacts go where
    an MLflow server puts them, or with a database URI to <home>/mlartifacts. Yields a NullRun
    when tracking is disabled or mlflow is not installed.
    """
    if not settings.enabled:
        _say_tracking_off("tracking.enabled is false")
        yield NullRun()
        return
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        _say_tracking_off(f"mlflow cannot be imported: {exc}")
        yield NullRun()
        return
    _check_pipeline_run_id(pipeline_run_id)

    uri = tracking_uri(settings, home)
    artifact_location = _artifact_location(uri, home)
    with _refused_as_tracking_error(uri, f"start the run of stage {stage!r}"):
        client = MlflowClient(tracking_uri=uri)
        parent_id, run_id = _start(
            client, settings.experiment, artifact_location, stage, pipeline_run_id, dataset_hash
        )

    run = StageRun(client, run_id)
    try:
        if config is not None:
            run.log_params(config)
        yield run
    except BaseException:
        _end(client, parent_id, run_id, "FAILED")
        raise
    _end(client, parent_id, run_id, "FINISHED")


def close_pipeline_runs(
    settings: TrackingSettings,
    home: Path,
    pipeline_run_id: str,
    state: str,
    error_message: str | None = None,
) -> list[str]:
    """What the pipeline's exit handler does once every step has ended: after a failure or
    a cancellation, end the pipeline run's MLflow runs that are still open (a killed pod
    never ends its own) as FAILED, or KILLED when cancelled, end the pipeline's own run so
    too, and tag it with the KFP state, the step(s) that failed and the error. A pipeline
    that failed before any stage run (e.g. in ingest) gets its run here, so the failure is
    in MLflow too. After success nothing changes. Returns the ids of the runs it ended.

    Which step failed comes from MLflow (a stage run that ended FAILED or was left open):
    KFP tells the exit handler only the state of the whole pipeline.
    """
    if state == "SUCCEEDED":
        return []
    if not settings.enabled:
        _say_tracking_off("tracking.enabled is false")
        return []
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        _say_tracking_off(f"mlflow cannot be imported: {exc}")
        return []
    _check_pipeline_run_id(pipeline_run_id)
    status = "KILLED" if state.upper() in CANCELLED_STATES else "FAILED"
    uri = tracking_uri(settings, home)
    with _refused_as_tracking_error(uri, f"close the runs of pipeline run {pipeline_run_id}"):
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, settings.experiment, _artifact_location(uri, home))
        parent_id = _parent_run_id(client, experiment_id, pipeline_run_id)
        stages = client.search_runs(
            [experiment_id],
            f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}' and tags.`{TAG_KIND}` = 'stage'",
        )
        ended: list[str] = []
        failed: list[str] = []
        for run in sorted(stages, key=lambda run: run.info.start_time):
            if run.info.status in OPEN_STATUSES:
                client.set_terminated(run.info.run_id, status)
                ended.append(str(run.info.run_id))
            if run.info.status in OPEN_STATUSES | {"FAILED"}:
                failed.append(run.data.tags.get(TAG_STAGE, run.info.run_id))
        tags = {
            TAG_PIPELINE_STATE: state,
            TAG_FAILED_STEP: ", ".join(failed) or NO_STAGE_RUN,
        }
        if error_message:
            from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

            tags[TAG_PIPELINE_ERROR] = _clip(redact(error_message), MAX_TAG_VAL_LENGTH)
        StageRun(client, parent_id).set_tags(tags)
        client.set_terminated(parent_id, status)
    return [*ended, parent_id]
