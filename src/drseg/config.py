"""Typed settings: one object per step, read from a YAML file plus environment overrides.

Precedence, lowest first: defaults in this file, the YAML file (``--config`` or
``DRSEG_CONFIG``), then environment variables ``DRSEG_<SECTION>__<FIELD>`` (for example
``DRSEG_INGEST__WORKING_WIDTH=2048``). S3 credentials also fall back to the usual AWS
variables, so nothing secret needs to live in a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

LESION_CLASSES: tuple[str, ...] = ("MA", "HE", "EX", "SE")
"""The four lesion classes the model segments, in channel order."""

ENV_PREFIX = "DRSEG_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(Section):
    """Where s3:// URLs go. Unset fields fall back to boto3's own lookup (AWS_* env vars)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None


class IngestSettings(Section):
    layout: Literal["auto", "idrid", "generic", "unlabelled"] = "auto"
    working_width: int = Field(1024, ge=64, le=8192)
    classes: tuple[str, ...] = (*LESION_CLASSES, "OD")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    min_records: int = Field(1, ge=1)
    max_pixels: int = Field(60_000_000, ge=1)
    """Images with more pixels than this are refused from their header, before decoding."""
    max_file_bytes: int = Field(200_000_000, ge=1)
    workers: int | None = Field(None, ge=1)
    """Processes; None means one per core."""

    @field_validator("classes")
    @classmethod
    def _upper_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        upper = tuple(c.upper() for c in value)
        if len(set(upper)) != len(upper):
            raise ValueError(f"classes must be unique, got {value}")
        return upper


class ClaheSettings(Section):
    clip_limit: float = Field(2.0, gt=0.0)
    tile_grid: int = Field(8, ge=1, le=64)
    workers: int | None = Field(None, ge=1)


class SynthSettings(Section):
    n: int = Field(24, ge=1)
    seed: int = 0
    width: int = Field(1024, ge=128)
    layout: Literal["idrid", "generic"] = "generic"


class ModelSettings(Section):
    encoder: str = "resnet34"
    """Any segmentation-models-pytorch encoder; built with encoder_weights=None (no downloads)."""
    classes: tuple[str, ...] = LESION_CLASSES
    reconstruction_weight: float = Field(0.1, ge=0.0)
    """Weight of the reconstruction loss; 0 turns the reconstruction head off."""


class FinetuneSettings(Section):
    patch_size: int = Field(512, ge=32)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(2000, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    foreground_fraction: float = Field(0.6, ge=0.0, le=1.0)
    """Share of patches centred on a lesion pixel; the rest are uniform inside the FOV."""
    class_sampling: tuple[float, ...] = (0.35, 0.25, 0.2, 0.2)
    """Per lesion class (model.classes order): how often a foreground patch centres on it.
    Rare classes (MA, SE) get more than their pixel share, or they are barely seen."""
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    """Per-class weight of the Dice + BCE loss."""
    reconstruction_loss: Literal["l1", "mse"] = "l1"
    reconstruction_input: Literal["clean", "noised", "masked"] = "masked"
    checkpoint_every: int = Field(200, ge=1)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    """auto: bf16-mixed on GPU, 32-true on CPU."""
    strategy: str = "auto"
    """Lightning strategy; "ddp" for several GPUs."""
    devices: int | str = "auto"
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    encoder_init: Path | None = None
    """Encoder weights file (from the pretrain stage); None starts from random weights."""


class EvaluateSettings(Section):
    tile_size: int = Field(512, ge=32)
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    tta_flips: bool = True
    batch_size: int = Field(4, ge=1)
    default_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    overlays: int = Field(4, ge=0)
    """Validation photographs drawn with prediction and ground truth."""


class TrackingSettings(Section):
    uri: str | None = None
    """MLflow tracking URI; None means a SQLite file in the workspace (<home>/mlflow.db)."""
    experiment: str = "drseg"
    enabled: bool = True


class Settings(Section):
    home: Path = Path(".drseg")
    """Workspace for local runs; DRSEG_HOME overrides it."""
    storage: StorageSettings = StorageSettings()
    synth: SynthSettings = SynthSettings()
    ingest: IngestSettings = IngestSettings()
    clahe: ClaheSettings = ClaheSettings()
    model: ModelSettings = ModelSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    tracking: TrackingSettings = TrackingSettings()


class SettingsError(ValueError):
    """A settings file or variable is wrong; the message names it and the fix."""


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if "DRSEG_HOME" in environ:
        overrides["home"] = environ["DRSEG_HOME"]
    aws = {
        "access_key_id": environ.get("AWS_ACCESS_KEY_ID"),
        "secret_access_key": environ.get("AWS_SECRET_ACCESS_KEY"),
        "region": environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION"),
        "endpoint_url": environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"),
    }
    storage = {k: v for k, v in aws.items() if v}
    if storage:
        overrides["storage"] = storage
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
        try:
            value: Any = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        overrides.setdefault(section, {})[field] = value
    return overrides


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    path: Path | str | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Defaults, then the YAML file, then environment overrides."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("DRSEG_CONFIG")
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"{path}: settings file not found; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: not valid YAML ({exc}); fix the syntax") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of sections at the top level")
        data = loaded
    data = _merge(data, _env_overrides(environ))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        source = f"{path} and DRSEG_* variables" if path else "DRSEG_* variables"
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise SettingsError(f"invalid settings from {source}:\n{problems}") from exc


def settings_as_yaml(settings: Settings) -> str:
    """The effective settings, secrets masked, as YAML (what `drseg config show` prints)."""
    return yaml.safe_dump(json.loads(settings.model_dump_json()), sort_keys=False)
