"""Typed settings: one object per step, read from a YAML file plus environment overrides.

Precedence, lowest first: defaults in this file, the YAML file (``--config`` or
``DRSEG_CONFIG``), then environment variables ``DRSEG_<SECTION>__<FIELD>`` (for example
``DRSEG_INGEST__WORKING_WIDTH=2048``; deeper settings nest the same way:
``DRSEG_CLUSTER__STEPS__FINETUNE__GPUS=4``). S3 credentials also fall back to the usual AWS
variables, so nothing secret needs to live in a file.

An environment value is typed by its field, not guessed from its text:
``DRSEG_TRACKING__EXPERIMENT=2024`` is the string "2024" and ``DRSEG_CLUSTER__NAMESPACE=no``
the string "no", while a number or boolean field parses its text. A list or mapping field
takes a YAML flow value (``DRSEG_MODEL__CLASSES="[MA, HE]"``) whose items are typed the same
way. Checks that span sections (class-list lengths, sizes against the working width) run
when the settings load, not hours into a run.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from drseg import __version__
from drseg.classes import LESION_CLASSES, LESION_TABLE
from drseg.errors import UserError
from drseg.secrets import redact

ENV_PREFIX = "DRSEG_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(Section):
    """Where s3:// URLs go. Unset fields fall back to boto3's own lookup (AWS_* env vars)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None


WORKING_WIDTHS = (128, 8192)
"""Sane working widths, px: below 128 a microaneurysm is under a pixel and the U-Net's five
halvings leave 4 px; above 8192 no fundus camera has the detail (IDRiD: 1024-2048)."""


class IngestSettings(Section):
    layout: Literal["auto", "idrid", "generic", "unlabelled"] = "auto"
    working_width: int = 1024
    classes: tuple[str, ...] = (*LESION_CLASSES, "OD")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    min_records: int = Field(1, ge=1)
    max_pixels: int = Field(60_000_000, ge=1)
    """Images with more pixels than this are refused from their header, before decoding."""
    max_file_bytes: int = Field(200_000_000, ge=1)
    workers: int | None = Field(None, ge=1)
    """Processes; None means one per core."""

    @field_validator("working_width")
    @classmethod
    def _sane_width(cls, value: int) -> int:
        low, high = WORKING_WIDTHS
        if not low <= value <= high:
            raise ValueError(
                f"working width {value} px is outside {low}..{high}: below {low} px lesions "
                f"vanish (microaneurysms are ~4 px across at 1024); use 1024 or 2048"
            )
        return value

    @field_validator("classes")
    @classmethod
    def _upper_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _upper_unique(value)


def _upper_unique(value: tuple[str, ...]) -> tuple[str, ...]:
    upper = tuple(c.upper() for c in value)
    if not upper or len(set(upper)) != len(upper):
        raise ValueError(f"classes must be a non-empty list of unique names, got {list(value)}")
    return upper


SIZE_MULTIPLE = 32
"""U-Net encoders downsample five times: image sides the graph sees are multiples of 2**5."""


def check_side(value: int) -> int:
    """A patch, crop or tile side: a positive multiple of SIZE_MULTIPLE."""
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
        nearest = max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        raise ValueError(
            f"{value} is not a multiple of {SIZE_MULTIPLE} (the encoder halves it five times); "
            f"use {nearest}"
        )
    return value


class ClaheSettings(Section):
    clip_limit: float = Field(2.0, gt=0.0)
    tile_grid: int = Field(8, ge=1, le=64)
    workers: int | None = Field(None, ge=1)


class SynthSettings(Section):
    n: int = Field(24, ge=1)
    pool_n: int = Field(24, ge=1)
    """Unlabelled photographs (other seeds than the labelled ones) for pretraining."""
    seed: int = 0
    width: int = Field(1024, ge=128)
    layout: Literal["idrid", "generic"] = "generic"


class ModelSettings(Section):
    encoder: str = "resnet34"
    """Any segmentation-models-pytorch encoder; built with encoder_weights=None (no downloads)."""
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    """Width of the U-Net's five decoder stages, deepest first (smp's default). A narrower
    decoder is the CPU profile's miniature: the default one is ~40 % of a resnet18 U-Net's
    training step on a CPU (bench/RESULTS.md)."""
    classes: tuple[str, ...] = LESION_CLASSES
    reconstruction_weight: float = Field(0.1, ge=0.0)
    """Weight of the reconstruction loss; 0 turns the reconstruction head off."""

    @field_validator("classes")
    @classmethod
    def _upper_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _upper_unique(value)

    @field_validator("decoder_channels")
    @classmethod
    def _five_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) != 5 or min(value) < 1:
            raise ValueError(f"give five positive widths, deepest stage first; got {value}")
        return value


class TrainingRunSettings(Section):
    """What a Lightning training stage (fine-tune, pretrain) needs of its run, in one place."""

    max_steps: int = Field(2000, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    checkpoint_every: int = Field(200, ge=1)
    checkpoint_uri: str | None = None
    """Where training also keeps its last checkpoint as it goes (s3://bucket/prefix, or a
    folder), so a lost pod loses at most checkpoint_every steps: a step run again finds it
    there and resumes. In the pipeline each run gets its own prefix under it (fine-tuning:
    /finetune/<pipeline run id>; pretraining: /pretrain/<hash of its inputs>); None: only
    the local <out>/checkpoints, which a pod takes with it."""
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    """auto: bf16-mixed on GPU, 32-true on CPU."""
    strategy: str = "auto"
    """Lightning strategy; "ddp" for several GPUs (pretraining then gathers negatives
    across devices)."""
    devices: int | str = "auto"
    seed: int = 0

    @field_validator("devices", mode="before")
    @classmethod
    def _device_count(cls, value: object) -> object:
        """A count from an environment variable arrives as text: "2" means two devices."""
        return int(value) if isinstance(value, str) and value.isdigit() else value


class FinetuneSettings(TrainingRunSettings):
    patch_size: int = 512
    batch_size: int = Field(8, ge=1)
    schedule: Literal["cosine", "poly"] = "cosine"
    foreground_fraction: float = Field(0.6, ge=0.0, le=1.0)
    """Share of patches centred on a lesion pixel; the rest are uniform inside the FOV."""
    class_sampling: tuple[float, ...] = tuple(row.sampling_share for row in LESION_TABLE)
    """Per lesion class (model.classes order): how often a foreground patch centres on it.
    Rare classes (MA, SE) get more than their pixel share, or they are barely seen."""
    class_weights: tuple[float, ...] = tuple(row.loss_weight for row in LESION_TABLE)
    """Per-class weight of the Dice + BCE loss."""
    reconstruction_loss: Literal["l1", "mse"] = "l1"
    reconstruction_input: Literal["clean", "noised", "masked"] = "masked"
    batchnorm_batches: int = Field(50, ge=0)
    """After training, BatchNorm's statistics are recomputed as plain averages over this many
    batches of clean patches drawn uniformly inside the field of view, as whole photographs
    look. Training's running averages follow lesion-centred patches (and their corrupted
    copies) and lag the changing weights; scored on whole photographs, a model could lose
    what it had learnt (exudate AUPR 0.6 -> 0.02 on some runs). 0 keeps them."""
    compile: bool = False
    """torch.compile the model's training forward (and with it the backward): faster steps on
    a GPU after a minute or two of compiling, worth it for runs of thousands of steps."""

    @field_validator("patch_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        return check_side(value)


class PretrainSettings(TrainingRunSettings):
    """SimCLR pretraining of the U-Net encoder on unlabelled photographs."""

    enabled: bool = True
    """The encoder initialisation: True fine-tunes from the SimCLR encoder, False from
    random weights (the pipeline's pretrain step then does no work)."""
    crop_size: int = 256
    """Side of each view, in working-resolution pixels (a multiple of 32)."""
    min_fov_fraction: float = Field(0.8, ge=0.0, le=1.0)
    """Share of a crop that must lie inside the field of view."""
    batch_size: int = Field(64, ge=2)
    """Photographs per step (two views each, so 2 x batch_size images)."""
    lr: float = Field(1e-3, gt=0)
    temperature: float = Field(0.2, gt=0)
    """NT-Xent temperature."""
    projection_dim: int = Field(128, ge=8)
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes that place and cut the views (fine-tuning needs none: its
    patches are drawn on the training device)."""
    include_labelled: bool = False
    """Also pretrain on the labelled training photographs, without their labels. Off by
    default: it makes every change to the labelled set re-run pretraining in the pipeline
    (see pipelines/training.py), for a set that is small beside the pool."""

    @field_validator("crop_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        return check_side(value)


class EvaluateSettings(Section):
    """Evaluation scores the exported graph as served (whole photographs, no tiles, no
    flips: drseg.evaluate.served), so it has no inference settings of its own."""

    folds: int = Field(5, ge=2)
    """Cross-fitting: the split's photographs are dealt into this many folds (at most one
    per photograph), each scored at thresholds tuned on the others."""
    default_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """Threshold of a class with no lesion pixel to tune on."""
    overlays: int = Field(4, ge=0)
    """Validation photographs drawn with prediction and ground truth."""


GateMetric = Literal["merged_dice", "dice", "aupr"]
ClassMetric = Literal["dice", "aupr"]


class GateSettings(Section):
    """The promotion rules; all of them must pass (a not-applicable row does not block)."""

    metric: GateMetric = "merged_dice"
    """What `minimum` applies to: the dataset-level Dice of the merged any-lesion mask, or a
    per-lesion metric that every evaluated lesion class must reach."""
    minimum: float = Field(0.8, ge=0.0, le=1.0)
    class_metric: ClassMetric = "dice"
    """The per-lesion metric read by class_minimums and by the regression rule."""
    class_minimums: dict[str, float] = Field(
        default_factory=lambda: {"MA": 0.15, "HE": 0.3, "EX": 0.3, "SE": 0.1}
    )
    """Lesion class -> its floor of class_metric, on top of the main rule: the merged Dice
    barely moves when a rare class (MA, SE) is missed entirely, a floor does. The defaults
    lie well below every class of the passing runs measured (README, "The gate") and well
    above the ~0 of a model that misses the class."""
    max_regression: float | None = Field(0.05, ge=0.0, le=1.0)
    """No lesion class (class_metric) and not the merged Dice may score more than this
    below @champion's graph on the same photographs; None turns the rule off."""

    @field_validator("class_minimums")
    @classmethod
    def _upper_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        out_of_range = {k: v for k, v in value.items() if not 0.0 <= v <= 1.0}
        if out_of_range:
            raise ValueError(f"class minimums must lie in [0, 1], got {out_of_range}")
        return {k.upper(): v for k, v in value.items()}


class RegistrySettings(Section):
    model_name: str = Field("drseg-lesions", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The MLflow registered model that passing models become versions of."""


Shape = tuple[int, int, int]
"""(batch, height, width) of the image input; channels are always 3."""


def check_shape(name: str, shape: Shape) -> Shape:
    """A shape with positive sizes and sides that are multiples of SIZE_MULTIPLE."""
    batch, height, width = shape
    if batch < 1 or height < SIZE_MULTIPLE or width < SIZE_MULTIPLE:
        raise ValueError(
            f"{name} = {shape}: batch must be >= 1 and height, width >= {SIZE_MULTIPLE}"
        )
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(
            f"{name} = {shape}: height and width must be multiples of {SIZE_MULTIPLE}; "
            f"use ({batch}, {-(-height // SIZE_MULTIPLE) * SIZE_MULTIPLE}, "
            f"{-(-width // SIZE_MULTIPLE) * SIZE_MULTIPLE})"
        )
    return shape


def check_order(low: Shape, opt: Shape, high: Shape) -> None:
    """min <= opt <= max in every dimension, as TensorRT requires of a profile."""
    if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise ValueError(
            f"TensorRT shapes must satisfy min <= opt <= max in every dimension, got "
            f"min {low}, opt {opt}, max {high}; fix export.trt_min_shape / trt_opt_shape / "
            f"trt_max_shape"
        )


def padded(side: float) -> int:
    """The next multiple of SIZE_MULTIPLE at or above `side` (what the client pads to)."""
    return -(-round(side) // SIZE_MULTIPLE) * SIZE_MULTIPLE


class ExportSettings(Section):
    opset: int = Field(17, ge=13)
    """ONNX opset; 17 loads in the ONNX Runtime of every Triton release since 23.02."""
    parity_tolerance: float = Field(1e-3, gt=0.0)
    """Largest allowed |ONNX Runtime - PyTorch| over all output probabilities."""
    reconstruction: bool = False
    """Also export the reconstruction head as a second output (for previews only)."""
    trt_min_shape: Shape | None = None
    """None: (1, 256, 256), or the opt shape's sides where the working size is smaller."""
    trt_opt_shape: Shape | None = None
    """None: derived from the working width and photo_aspect (trt_profile)."""
    trt_max_shape: Shape | None = None
    """None: derived from the working width, max_photo_aspect and trt_max_batch; a shape
    given here must hold a working-size photograph, or the settings are refused at load."""
    trt_max_batch: int = Field(4, ge=1)
    photo_aspect: float = Field(2848 / 4288, gt=0.0, le=4.0)
    """Height / width of the photographs served most (IDRiD's 4288 x 2848): the shape the
    engine is tuned for."""
    max_photo_aspect: float = Field(1.0, gt=0.0, le=4.0)
    """The tallest photograph the engine must accept (1.0: square, as some cameras take)."""
    trt_fp16: bool = True
    trt_workspace_gib: float = Field(4.0, gt=0.0)
    plan_agreement: float = Field(0.98, gt=0.0, le=1.0)
    """A built TensorRT plan is served only if, on the validation photographs, its masks
    agree with the ONNX graph's (the graph the gate scored) at least this much: per-class
    Dice between the two, pooled over the photographs, lowest class."""

    @field_validator("trt_min_shape", "trt_opt_shape", "trt_max_shape")
    @classmethod
    def _multiple_of_32(cls, value: Shape | None, info: ValidationInfo) -> Shape | None:
        return None if value is None else check_shape(f"export.{info.field_name}", value)

    @model_validator(mode="after")
    def _max_at_least_the_tallest(self) -> ExportSettings:
        if self.max_photo_aspect < self.photo_aspect:
            raise ValueError(
                f"export.max_photo_aspect {self.max_photo_aspect} is below photo_aspect "
                f"{self.photo_aspect}; the tallest photograph cannot be shorter than the usual"
            )
        return self


def trt_profile(export: ExportSettings, working_width: int) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) (batch, height, width) of the TensorRT optimisation profile for
    photographs resized to `working_width`: opt is the usual photograph (photo_aspect), max
    the tallest (max_photo_aspect) at trt_max_batch, both padded as the client pads. A
    shape given in the settings is kept, and refused when it cannot hold what it must."""
    width = padded(working_width)
    opt = export.trt_opt_shape or (1, padded(working_width * export.photo_aspect), width)
    needed = (padded(working_width * export.max_photo_aspect), width)
    high = export.trt_max_shape or (export.trt_max_batch, *needed)
    if high[1] < needed[0] or high[2] < needed[1]:
        raise ValueError(
            f"export.trt_max_shape {high} cannot hold a photograph at working width "
            f"{working_width} ({needed[0]} x {needed[1]} padded, height / width up to "
            f"export.max_photo_aspect {export.max_photo_aspect}); TensorRT would refuse it "
            f"when served. Unset export.trt_max_shape to derive it, or give at least "
            f"(batch, {needed[0]}, {needed[1]})"
        )
    low = export.trt_min_shape or (1, min(256, opt[1]), min(256, opt[2]))
    check_order(low, opt, high)
    return low, opt, high


class ServeSettings(Section):
    model_name: str = Field("drseg", pattern=r"^[A-Za-z0-9_.-]+$")
    """Triton model name (letters, digits, '.', '_', '-')."""
    host: str = "127.0.0.1"
    """Address the local server binds; loopback unless it must be reached from elsewhere."""
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    metrics_port: int = Field(8002, ge=1, le=65535)
    max_batch_size: int = Field(4, ge=1)
    preferred_batch_sizes: tuple[int, ...] = (2, 4)
    max_queue_delay_us: int = Field(2000, ge=0)
    """How long Triton holds a request to batch it with others (microseconds)."""
    instance_kind: Literal["cpu", "gpu"] = "cpu"
    """instance_group kind written to config.pbtxt (KIND_CPU / KIND_GPU)."""
    instance_count: int = Field(1, ge=1)
    ort_threads: int = Field(0, ge=0)
    """ONNX Runtime intra-op threads in the local server; 0 lets it choose (one per core)."""
    max_input_pixels: int = Field(2048 * 2048, ge=1)
    """Largest image (height x width, padded) the local server runs; a larger request is
    refused before ONNX Runtime allocates for it. 2048 x 2048 holds the widest working size
    (configs/idrid.yaml: 2048 wide)."""
    exit_timeout_s: int = Field(5, ge=0)
    """How long the local server waits for in-flight requests when stopping."""

    @model_validator(mode="after")
    def _batch_sizes(self) -> ServeSettings:
        too_big = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch_size]
        if too_big:
            raise ValueError(
                f"preferred_batch_sizes {too_big} must lie in 1..max_batch_size "
                f"({self.max_batch_size})"
            )
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ValueError(
                f"http_port, grpc_port and metrics_port must differ, got {self.http_port}, "
                f"{self.grpc_port}, {self.metrics_port}"
            )
        return self


_IMAGE_REGISTRY = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$"
)
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Toleration(Section):
    """One Kubernetes toleration, as in a pod spec."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


def _gpu_toleration() -> list[Toleration]:
    return [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]


_CPU = re.compile(r"^([0-9]*[.])?[0-9]+m?$")
_MEMORY = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")
_MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_MEMORY_UNITS |= {"E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_MEMORY_UNITS |= {"Pi": 2**50, "Ei": 2**60}


def _cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _memory_bytes(quantity: str) -> int:
    digits = re.match(r"^[0-9]+", quantity)
    assert digits is not None  # checked by _MEMORY before
    return int(digits.group()) * _MEMORY_UNITS[quantity[digits.end() :]]


class StepResources(Section):
    """What one pipeline step asks of the cluster, fixed when the pipeline is compiled
    (`drseg pipeline compile|submit|schedule`); kfp.local ignores it. Quantities are
    Kubernetes's: CPU "2" or "500m", memory "8Gi"."""

    cpu_request: str = "1"
    cpu_limit: str | None = None
    """None: no CPU limit (a limit throttles a busy step without protecting its neighbours,
    whom the request already protects)."""
    memory_request: str = "2Gi"
    memory_limit: str | None = "4Gi"
    """Above it the kernel kills the pod (OOMKilled); None: no limit."""
    retries: int = Field(0, ge=0, le=10)
    """Extra attempts after a failure, for steps where a transient fault is plausible (an
    object-store read, a registry write); 0 where a second attempt would give the same
    answer."""
    backoff_s: int = Field(30, ge=0)
    """Wait before the first retry; each later wait is backoff_factor times the previous."""
    backoff_factor: float = Field(2.0, ge=1.0)
    timeout_s: int = Field(3600, ge=0)
    """Deadline of one attempt (the pod's activeDeadlineSeconds); 0: none."""

    @property
    def retry_window_s(self) -> int:
        """How long KFP may keep retrying, counted (by Argo) from the FIRST attempt's start:
        every attempt at its deadline plus every wait, so a long step's retries are not cut
        off by KFP's one-hour default window."""
        waits = sum(self.backoff_s * self.backoff_factor**i for i in range(self.retries))
        return math.ceil((self.retries + 1) * self.timeout_s + waits)

    @field_validator("cpu_request", "cpu_limit")
    @classmethod
    def _cpu_quantity(cls, value: str | None) -> str | None:
        if value is not None and not _CPU.match(value):
            raise ValueError(
                f"{value!r} is not a CPU quantity: use cores (2, 0.5) or millicores (500m)"
            )
        return value

    @field_validator("memory_request", "memory_limit")
    @classmethod
    def _memory_quantity(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.match(value):
            raise ValueError(
                f"{value!r} is not a memory quantity: use a whole number with an optional unit "
                "(E, P, T, G, M, K or Ei, Pi, Ti, Gi, Mi, Ki), e.g. 8Gi or 512Mi"
            )
        return value

    @model_validator(mode="after")
    def _retried_steps_have_a_deadline(self) -> StepResources:
        if self.retries and not self.timeout_s:
            raise ValueError(
                f"retries is {self.retries} but timeout_s is 0: KFP's retry window is counted "
                "from the first attempt, so a retried step needs a deadline; set timeout_s"
            )
        return self

    @model_validator(mode="after")
    def _requests_within_limits(self) -> StepResources:
        if self.cpu_limit is not None and _cpu_cores(self.cpu_request) > _cpu_cores(self.cpu_limit):
            raise ValueError(
                f"cpu_request {self.cpu_request} is above cpu_limit {self.cpu_limit}; "
                "raise the limit or lower the request"
            )
        if self.memory_limit is not None and _memory_bytes(self.memory_request) > _memory_bytes(
            self.memory_limit
        ):
            raise ValueError(
                f"memory_request {self.memory_request} is above memory_limit "
                f"{self.memory_limit}; raise the limit or lower the request"
            )
        return self


class GpuStepResources(StepResources):
    """A step that runs on GPU nodes (cluster.gpu_node_selector, gpu_tolerations, /dev/shm)."""

    gpus: int = Field(1, ge=1, le=16)
    """GPUs of one pod; Lightning trains on all of them (DDP)."""
    accelerator_type: str = "nvidia.com/gpu"
    """The extended resource the GPUs are counted in (the NVIDIA device plugin's by default)."""


_HOURS = 3600


class StepsResources(Section):
    """Per pipeline step: resources, retries and deadline. Both ingests (labelled and pool)
    share `fingerprint`, `ingest` and `clahe`. The defaults fit IDRiD-sized data at a working
    width of 1024-2048 px; size them to the data before a larger run."""

    fingerprint: StepResources = StepResources(
        cpu_request="250m", memory_request="512Mi", memory_limit="1Gi", retries=3, timeout_s=900
    )
    """Lists the source (an object-store read: retried)."""
    ingest: StepResources = StepResources(
        cpu_request="4", memory_request="8Gi", memory_limit="16Gi", retries=3, timeout_s=4 * _HOURS
    )
    """Reads every photograph from the source (object-store reads: retried)."""
    clahe: StepResources = StepResources(
        cpu_request="4", memory_request="4Gi", memory_limit="8Gi", timeout_s=2 * _HOURS
    )
    pretrain: GpuStepResources = GpuStepResources(
        cpu_request="8",
        memory_request="32Gi",
        memory_limit="64Gi",
        retries=2,
        timeout_s=24 * _HOURS,
    )
    """Retried: a lost pod (node drained, preempted) is the common failure of an hours-long
    step."""
    finetune: GpuStepResources = GpuStepResources(
        cpu_request="8",
        memory_request="32Gi",
        memory_limit="64Gi",
        retries=2,
        timeout_s=24 * _HOURS,
    )
    export: StepResources = StepResources(
        cpu_request="2", memory_request="4Gi", memory_limit="8Gi", timeout_s=_HOURS
    )
    evaluate: StepResources = StepResources(
        cpu_request="4", memory_request="8Gi", memory_limit="16Gi", timeout_s=4 * _HOURS
    )
    gate: StepResources = StepResources(
        cpu_request="250m", memory_request="512Mi", memory_limit="1Gi", timeout_s=900
    )
    """Never retried: a verdict is not a transient fault."""
    registration: StepResources = StepResources(
        cpu_request="1", memory_request="2Gi", memory_limit="4Gi", retries=3, timeout_s=_HOURS
    )
    """The register step: a registry write (retried)."""
    tensorrt: GpuStepResources = GpuStepResources(
        cpu_request="4", memory_request="16Gi", memory_limit="32Gi", timeout_s=2 * _HOURS
    )
    triton_repository: StepResources = StepResources(
        cpu_request="1", memory_request="2Gi", memory_limit="4Gi", timeout_s=_HOURS
    )
    publish: StepResources = StepResources(
        cpu_request="1", memory_request="2Gi", memory_limit="4Gi", retries=3, timeout_s=_HOURS
    )
    """An object-store write (retried; publishing is idempotent)."""
    close_runs: StepResources = StepResources(
        cpu_request="250m", memory_request="512Mi", memory_limit="1Gi", retries=3, timeout_s=900
    )
    """The exit handler: MLflow writes (retried)."""

    @model_validator(mode="before")
    @classmethod
    def _over_each_steps_defaults(cls, data: Any) -> Any:
        """A step given in part keeps the rest of ITS defaults (ingest keeps its retries
        when only its memory is set), not the generic StepResources ones."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is not None and isinstance(value, dict):
                merged[name] = {**field.get_default().model_dump(), **value}
        return merged

    @field_validator("gate")
    @classmethod
    def _gate_not_retried(cls, value: StepResources) -> StepResources:
        if value.retries:
            raise ValueError(
                f"gate.retries is {value.retries}: the gate's verdict is not a transient "
                "fault, a retry gives the same answer; set it to 0"
            )
        return value


class ClusterSettings(Section):
    """Where and how the pipeline runs on Kubeflow Pipelines. No credentials here: only the
    names of the Kubernetes Secrets that hold them, so the compiled YAML can be checked in."""

    kfp_host: str | None = None
    """KFP API endpoint, e.g. https://kubeflow.example.org/pipeline; needed by submit/schedule."""
    namespace: str | None = None
    """Multi-user KFP: the profile's namespace; None for a single-user deployment, which
    refuses namespaced experiments."""
    experiment: str = "drseg-training"
    """KFP experiment that runs and recurring runs are filed under."""
    kfp_auth: Literal["none", "service-account-token"] = "none"
    """How submit/schedule authenticate to the KFP API. "service-account-token": the pod's
    projected service-account token (audience pipelines.kubeflow.org) at kfp's path,
    KF_PIPELINES_SA_TOKEN_PATH or /var/run/secrets/kubeflow/pipelines/token, which a
    multi-user Kubeflow requires of an in-cluster client (manifests/pipelines); "none": no
    credentials (a single-user KFP)."""
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    """Node labels a GPU step must land on (GPU Operator's label by default)."""
    gpu_tolerations: list[Toleration] = Field(default_factory=_gpu_toleration)
    """GPU nodes are usually tainted so that CPU pods stay off them."""
    shm_size_gi: int = Field(8, ge=1, le=1024)
    """Memory-backed /dev/shm for GPU steps: DataLoader workers pass batches through it and
    the container runtime's 64 MiB default makes them die with a bus error."""
    image_registry: str = "ghcr.io/drseg"
    """Where the step images live: <image_registry>/<runtime|trainer|tensorrt>:<image_tag>
    (images/, `make images`)."""
    image_tag: str = __version__
    """Tag of every step image; the drseg version by default, a digest-pinned tag in
    production (the image must hold the drseg that compiled the pipeline)."""
    steps: StepsResources = StepsResources()

    def image(self, name: str) -> str:
        """The reference of step image `name` (runtime, trainer, tensorrt)."""
        return f"{self.image_registry}/{name}:{self.image_tag}"

    @field_validator("image_registry")
    @classmethod
    def _registry(cls, value: str) -> str:
        if not _IMAGE_REGISTRY.match(value):
            raise ValueError(
                f"{value!r} is not an image registry path: give host[:port]/path without a "
                "tag or trailing '/', e.g. registry.example.org:5000/ml/drseg"
            )
        return value

    @field_validator("image_tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        if not _IMAGE_TAG.match(value):
            raise ValueError(
                f"{value!r} is not an image tag: up to 128 letters, digits, '_', '.' or '-', "
                "not starting with '.' or '-'"
            )
        return value

    s3_secret: str = "drseg-s3"
    """Secret with the S3 credentials for ingest and for MLflow's artifact uploads."""
    s3_secret_env: dict[str, str] = Field(
        default_factory=lambda: {
            "access_key_id": "AWS_ACCESS_KEY_ID",
            "secret_access_key": "AWS_SECRET_ACCESS_KEY",
            "endpoint_url": "AWS_ENDPOINT_URL_S3",
        }
    )
    """Key in s3_secret -> environment variable the step sees (what boto3 and drseg read).
    Every key must exist in the Secret or the pod does not start (drop endpoint_url on AWS)."""
    mlflow_secret: str = "drseg-mlflow"
    """Secret with the MLflow tracking server and its credentials."""
    mlflow_secret_env: dict[str, str] = Field(
        default_factory=lambda: {
            "tracking_uri": "DRSEG_TRACKING__URI",
            "username": "MLFLOW_TRACKING_USERNAME",
            "password": "MLFLOW_TRACKING_PASSWORD",
        }
    )
    """Key in mlflow_secret -> environment variable the step sees."""

    @field_validator("s3_secret", "mlflow_secret")
    @classmethod
    def _secret_name(cls, value: str) -> str:
        if not _SECRET_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a Kubernetes Secret name: use lower-case letters, digits, "
                "'-' and '.', starting and ending with a letter or digit"
            )
        return value

    @field_validator("s3_secret_env", "mlflow_secret_env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [env for env in value.values() if not _ENV_NAME.match(env)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}; use A-Z, 0-9 and _")
        if not value:
            raise ValueError("map at least one Secret key to an environment variable")
        return value


class TrackingSettings(Section):
    uri: str | None = None
    """MLflow tracking URI; None means a SQLite file in the workspace (<home>/mlflow.db)."""
    experiment: str = "drseg"
    enabled: bool = True


class RolloutSettings(Section):
    """The canary on Argo Rollouts (`drseg publish`, `drseg rollout`, `drseg probe`)."""

    namespace: str = "default"
    name: str = "triton"
    """The Rollout (manifests/base)."""
    container: str = "triton"
    repository_uri: str = "s3://drseg-models/triton/{version}"
    """Where a version's Triton repository is published and served from; ``{version}`` is
    replaced by the version number."""
    canary_url: str = "triton-canary:8000"
    stable_url: str = "triton-stable:8000"
    """host:port of each track's Triton HTTP endpoint (the Services Argo points at each
    track; a `kubectl port-forward` from outside the cluster)."""
    probe_set: str | None = None
    """A labelled dataset (`drseg ingest` output: images/, masks/, manifest.json), local or
    s3://, that `drseg probe` segments on both tracks."""
    probe_tolerance: float = Field(0.02, gt=0)
    """Largest |canary - registered graph| probability allowed. Room for an FP16 TensorRT
    plan against ONNX Runtime in FP32 (not measured here: no TensorRT on these machines;
    tighten it once measured on the GPU nodes); a wrong graph differs by tenths."""
    max_dice_drop: float = Field(0.05, ge=0, le=1)
    """How far the canary's Dice may fall below stable's, per class, on the probe set."""
    probe_timeout_s: float = Field(120.0, gt=0)
    promote_timeout_s: float = Field(1800.0, ge=0)
    """How long `drseg rollout promote` waits for Argo to make the version stable (scaling
    the canary up loads its plans) before it leaves @champion where it is."""
    poll_s: float = Field(5.0, gt=0)


class Settings(Section):
    home: Path = Path(".drseg")
    """Workspace for local runs; DRSEG_HOME overrides it."""
    storage: StorageSettings = StorageSettings()
    synth: SynthSettings = SynthSettings()
    ingest: IngestSettings = IngestSettings()
    clahe: ClaheSettings = ClaheSettings()
    model: ModelSettings = ModelSettings()
    pretrain: PretrainSettings = PretrainSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    gate: GateSettings = GateSettings()
    registry: RegistrySettings = RegistrySettings()
    export: ExportSettings = ExportSettings()
    serve: ServeSettings = ServeSettings()
    cluster: ClusterSettings = ClusterSettings()
    tracking: TrackingSettings = TrackingSettings()
    rollout: RolloutSettings = RolloutSettings()

    # Checks across sections: a mismatch fails in milliseconds at load, not hours into a run.
    @model_validator(mode="after")
    def _classes_from_the_table(self) -> Settings:
        """Checked here, in milliseconds, instead of when fine-tuning starts."""
        classes = self.model.classes
        unknown = [c for c in classes if c not in LESION_CLASSES]
        if unknown or len(set(classes)) != len(classes) or not classes:
            raise ValueError(
                f"model.classes {list(classes)}: each must be one of the lesion classes "
                f"{list(LESION_CLASSES)} (drseg.classes), once"
            )
        for name in ("class_sampling", "class_weights"):
            values = getattr(self.finetune, name)
            if len(values) != len(classes):
                raise ValueError(
                    f"finetune.{name} has {len(values)} values for the {len(classes)} "
                    f"model.classes {list(classes)}; give one value per class, in that order"
                )
        return self

    @model_validator(mode="after")
    def _tensorrt_profile_holds_the_working_size(self) -> Settings:
        trt_profile(self.export, self.ingest.working_width)
        return self

    @model_validator(mode="after")
    def _gate_floors_name_model_classes(self) -> Settings:
        unknown = sorted(set(self.gate.class_minimums) - set(self.model.classes))
        if unknown:
            raise ValueError(
                f"gate.class_minimums names {unknown}, which are not in model.classes "
                f"{list(self.model.classes)}; set gate.class_minimums for the model's classes"
            )
        return self

    @model_validator(mode="after")
    def _model_classes_are_ingested(self) -> Settings:
        missing = [c for c in self.model.classes if c not in self.ingest.classes]
        if missing:
            raise ValueError(
                f"model.classes {missing} are not in ingest.classes "
                f"{list(self.ingest.classes)}: their masks would never be read; add them there"
            )
        return self

    @model_validator(mode="after")
    def _patches_fit_the_width(self) -> Settings:
        width = self.ingest.working_width
        for name, side in (
            ("finetune.patch_size", self.finetune.patch_size),
            ("pretrain.crop_size", self.pretrain.crop_size),
        ):
            if side > width:
                raise ValueError(
                    f"{name} = {side} is wider than the photographs (ingest.working_width = "
                    f"{width}); use at most {width // SIZE_MULTIPLE * SIZE_MULTIPLE}"
                )
        return self


class SettingsError(UserError, ValueError):
    """A settings file or variable is wrong; the message names it and the fix."""


def _env_value(raw: str) -> Any:
    """What pydantic types by the field: the text itself for a scalar, so a str field keeps
    "2024" or "no" and a number or boolean field parses it; a YAML flow list or mapping
    ("[MA, HE]", "{a: b}") as a list or dict of texts, typed item by item the same way."""
    try:
        value = yaml.load(raw, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return raw
    return value if isinstance(value, list | dict) else raw


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """(overrides, settings location -> the variable that set it)."""
    overrides: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    if "DRSEG_HOME" in environ:
        overrides["home"] = environ["DRSEG_HOME"]
        origin[("home",)] = "DRSEG_HOME"
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
        *sections, field = key[len(ENV_PREFIX) :].lower().split("__")
        inner = overrides
        for section in sections:
            inner = inner.setdefault(section, {})
        inner[field] = _env_value(raw)
        origin[(*sections, field)] = key
    return overrides, origin


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _problems(
    exc: ValidationError, origin: dict[tuple[str, ...], str], fallback: str, prefix: str = ""
) -> str:
    """One line: each problem with its setting and where that setting came from."""
    problems = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "no such setting; check the spelling (`drseg config show` lists them)"
        if not loc:  # a check across sections: its message names the settings
            problems.append(message)
            continue
        # The variable that set this setting, one above it, or (for a check of a whole
        # group, e.g. a step's retries against its deadline) one inside it.
        prefixes = [origin[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origin]
        inside = sorted(name for key, name in origin.items() if key[: len(loc)] == loc)
        source = ", ".join(prefixes[:1] or inside) or fallback
        where = ".".join((prefix, *loc) if prefix else loc)
        problems.append(f"{where} (from {source}): {message}")
    return "; ".join(problems)


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
            reason = " ".join(str(exc).split())
            raise SettingsError(f"{path}: not valid YAML ({reason}); fix the syntax") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of sections at the top level")
        data = loaded
    overrides, origin = _env_overrides(environ)
    try:
        return Settings.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        fallback = str(path) if path else "defaults"
        raise SettingsError(f"invalid settings: {_problems(exc, origin, fallback)}") from exc


SectionT = TypeVar("SectionT", bound=Section)


def with_options(section: SectionT, name: str, options: dict[str, Any]) -> SectionT:
    """`section` with command-line `options` (field -> value, None: not given), checked as
    the settings are: `drseg ingest --width 10` is refused like DRSEG_INGEST__WORKING_WIDTH=10."""
    given = {field: value for field, value in options.items() if value is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as exc:
        problems = _problems(exc, {}, "the command line", prefix=name)
        raise SettingsError(f"invalid option: {problems}") from exc


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    return value


def settings_as_yaml(settings: Settings) -> str:
    """The effective settings as YAML (what `drseg config show` prints), secrets masked:
    SecretStr fields by pydantic, credentials inside URLs (tracking.uri,
    storage.endpoint_url, ...) by drseg.secrets.redact."""
    return yaml.safe_dump(_redacted(json.loads(settings.model_dump_json())), sort_keys=False)
