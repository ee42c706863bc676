"""The fine-tune stage: train the multi-task U-Net on a dataset's train split.

One code path for the laptop and the cluster: Lightning picks the device, bf16 autocast on
a GPU or a CPU with bf16 matrix units, else fp32 ("auto" precision), and the strategy is a
setting ("ddp" for several GPUs). Checkpoints land in <out>/checkpoints every
`checkpoint_every` steps; the same command run again resumes from
<out>/checkpoints/last.ckpt, so a killed or pre-empted run loses at most `checkpoint_every`
steps, and goes on exactly as it would have without the kill.

Tracking is a callback (`log_metrics`), so this module needs only torch, Lightning,
segmentation-models-pytorch and OpenCV: it never imports MLflow or kfp.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from drseg import atomic
from drseg.artifacts import WEIGHTS_FILE
from drseg.config import FinetuneSettings, ModelSettings, StorageSettings, TrainingRunSettings
from drseg.models.unet import (
    MultiTaskUNet,
    build_model,
    load_encoder,
    state_mismatch,
)
from drseg.train.checkpoint_store import RemoteCheckpoint, UploadingCheckpointIO
from drseg.train.losses import multitask_loss
from drseg.train.patches import (
    PatchSampling,
    ResidentImages,
    TrainImages,
    batch_generator,
    class_probabilities,
    load_train_split,
    resident_images,
    sample_batch,
)

try:
    import pytorch_lightning as pl
except ImportError:  # the unified `lightning` distribution (as on the GPU machines)
    import lightning.pytorch as pl  # type: ignore[no-redef]

MetricsLogger = Callable[[dict[str, float], int], None]

LOG_EVERY = 10
"""Steps between calls of `log_metrics` (the first and the last step are always logged)."""
PROGRESS_LINES = 10
"""Progress lines ("step N/M: ...") a training run prints: logs that are not a terminal
(kubectl logs, `drseg run`) get no progress bar."""
POLY_POWER = 0.9
LAST_CHECKPOINT = "last.ckpt"
RECALIBRATION_STREAM = 1
"""Appended to (seed, rank) for the patches of the BatchNorm recalibration: a stream of its
own, apart from the training batches'."""


@dataclass(frozen=True)
class FinetuneResult:
    checkpoint: Path
    """The final Lightning checkpoint (<out>/checkpoints/last.ckpt)."""
    weights: Path
    """Plain state_dict of the MultiTaskUNet (<out>/model.pt), for evaluate and export."""
    steps: int
    """Global step reached, counting steps of the runs this one resumed."""
    final_loss: float
    seconds: float
    """Wall time of this call's training loop."""
    images_per_second: float
    """Training patches per second in this call, over all devices."""
    precision: str
    """The arithmetic Lightning trained in ("bf16-mixed", "32-true", ...)."""


def learning_rate_factor(
    step: int, warmup_steps: int, max_steps: int, schedule: Literal["cosine", "poly"]
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warm-up from 1/warmup_steps to 1, then cosine or polynomial (power 0.9) decay
    to 0 at max_steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, max_steps - warmup_steps), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return float((1.0 - progress) ** POLY_POWER)


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (Linux /proc/cpuinfo) of bf16 matrix units. With them a bf16 training step of
the U-Net takes about half the fp32 time (STACK.md, Xeon with AMX); without them bf16 is
emulated and slower than fp32 (AVX2-only EPYC)."""


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool:
    """Whether the CPU advertises BF16_CPU_FLAGS; `cpuinfo` defaults to /proc/cpuinfo's text
    (absent off Linux: False)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = {
        word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()
    }
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str) -> str:
    """ "auto" -> bf16-mixed on a GPU or a CPU with bf16 units, else 32-true; others as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() or cpu_has_bf16_units() else "32-true"


def recalibrate_batchnorm(model: torch.nn.Module, batches: Iterable[Tensor]) -> int:
    """Recompute every BatchNorm layer's running mean and variance as the plain average over
    `batches` (forward passes only; "precise BN"); returns the number of batches seen."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average
    model.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            model(batch)
            seen += 1
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.train(was_training)
    return seen


class StepLoggedModule(pl.LightningModule):
    """What both training stages share: per-step metrics to `log_metrics` every LOG_EVERY
    steps, wall time of the loop, and the last loss kept across checkpoints.

    A subclass's training_step calls `record(loss, figures)`; `figures` is called only on
    the steps that are logged, since reading a GPU tensor's value waits for the GPU.
    """

    def __init__(self, max_steps: int, log_metrics: MetricsLogger | None) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.log_metrics = log_metrics
        self.last_loss = math.nan
        self.steps_run = 0
        self.seconds = 0.0
        self._loss: Tensor | None = None
        self._figures: Callable[[], dict[str, float]] = dict
        self._lr = 0.0
        self._started = 0.0

    def record(self, loss: Tensor, figures: Callable[[], dict[str, float]]) -> None:
        self.log("loss", loss, prog_bar=True)
        self._loss = loss
        self._figures = figures
        self._lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:
            pl.utilities.rank_zero_info(
                f"resuming from step {self.global_step} ({self.trainer.ckpt_path})"
            )
        self._started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps_run += 1
        step = self.global_step
        if self._loss is None:
            return
        logged = step % LOG_EVERY == 0 or self.steps_run == 1 or step == self.max_steps
        if logged and self.log_metrics is not None and self.trainer.is_global_zero:
            self.log_metrics({**self._figures(), "lr": self._lr}, step)
        if step % max(1, self.max_steps // PROGRESS_LINES) == 0 or step == self.max_steps:
            per_step = (time.perf_counter() - self._started) / self.steps_run
            pl.utilities.rank_zero_info(
                f"step {step}/{self.max_steps}: loss {float(self._loss.detach()):.4f}, "
                f"{per_step:.2f} s/step, about {per_step * (self.max_steps - step):.0f} s left"
            )

    def on_train_end(self) -> None:
        self.seconds = time.perf_counter() - self._started
        if self._loss is not None:
            self.last_loss = float(self._loss.detach())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loss = self.last_loss if self._loss is None else float(self._loss.detach())
        checkpoint["drseg"] = {"last_loss": loss}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_loss = float(checkpoint.get("drseg", {}).get("last_loss", math.nan))


class BatchNumbers(IterableDataset[int]):
    """first, first + 1, ...: the batch numbers a run draws (from the restored step on a
    resumed run); the patches themselves are drawn on the device in training_step."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.first)


class FinetuneModule(StepLoggedModule):
    """Dice + BCE on the segmentation head, weighted reconstruction loss on the other."""

    def __init__(
        self,
        model: MultiTaskUNet,
        data: TrainImages,
        model_settings: ModelSettings,
        settings: FinetuneSettings,
        log_metrics: MetricsLogger | None,
    ) -> None:
        super().__init__(settings.max_steps, log_metrics)
        # Channels-last (NHWC) halves the step time of bf16 convolutions on an H100 (35 vs
        # 74 ms, resnet34, batch 16 at 512 px); on the CPU it is within noise (2.7-3.0 s).
        self.model = model.to(memory_format=torch.channels_last)
        self.data = data
        self.model_settings = model_settings
        self.settings = settings
        self.reconstructs = model.reconstruction_head is not None
        self.sampling = PatchSampling(
            patch_size=settings.patch_size,
            batch_size=settings.batch_size,
            foreground_fraction=settings.foreground_fraction,
            class_probs=class_probabilities(data, settings.class_sampling),
            reconstruction_input=settings.reconstruction_input if self.reconstructs else "clean",
        )
        self._resident: ResidentImages | None = None
        # A compiled function, not a module attribute: checkpoints keep the model's own keys.
        self._compiled = torch.compile(self.model.forward) if settings.compile else None

    def train_dataloader(self) -> DataLoader[int]:
        # Called after a checkpoint is restored: the stream continues at the restored step.
        return DataLoader(BatchNumbers(self.global_step), batch_size=None)

    def resident(self) -> ResidentImages:
        """The train split on this module's device, moved there at the first step."""
        if self._resident is None or self._resident.images.device != self.device:
            self._resident = resident_images(self.data, self.device, self.settings.patch_size)
        return self._resident

    def configure_optimizers(self) -> Any:
        settings = self.settings
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        factor = functools.partial(
            learning_rate_factor,
            warmup_steps=settings.warmup_steps,
            max_steps=settings.max_steps,
            schedule=settings.schedule,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def recalibrate_batchnorm(self) -> None:
        """Recompute BatchNorm's statistics on settings.batchnorm_batches batches of clean
        patches drawn uniformly inside the field of view (FinetuneSettings.batchnorm_batches);
        the same patches for the same seed, rank and data, so a resumed run ends equal."""
        count = self.settings.batchnorm_batches
        if count == 0:
            return
        sampling = dataclasses.replace(
            self.sampling, foreground_fraction=0.0, reconstruction_input="clean"
        )
        key = (self.settings.seed, self.global_rank, RECALIBRATION_STREAM)

        def patches() -> Iterator[Tensor]:
            for number in range(count):
                image = sample_batch(
                    self.resident(), sampling, batch_generator(key, number, self.device)
                )[0]
                yield image.contiguous(memory_format=torch.channels_last)

        with self.trainer.precision_plugin.forward_context():
            recalibrate_batchnorm(self.model, patches())
        pl.utilities.rank_zero_info(
            f"BatchNorm statistics recomputed on {count} batches of uniform patches"
        )

    def training_step(self, batch: int, batch_idx: int) -> Tensor:
        generator = batch_generator((self.settings.seed, self.global_rank), batch, self.device)
        image, masks, reconstruction_input = sample_batch(self.resident(), self.sampling, generator)
        size = image.shape[0]
        corrupted = self.reconstructs and self.settings.reconstruction_input != "clean"
        # One forward pass over the clean patches (segmentation) and, when the reconstruction
        # input is corrupted, their corrupted copies (reconstruction): twice the batch.
        inputs = torch.cat([image, reconstruction_input]) if corrupted else image
        forward = self._compiled or self.model
        logits, reconstruction = forward(inputs.contiguous(memory_format=torch.channels_last))
        parts = multitask_loss(
            logits[:size],
            masks,
            self.settings.class_weights,
            reconstruction=None if reconstruction is None else reconstruction[-size:],
            reconstruction_target=image,
            reconstruction_weight=self.model_settings.reconstruction_weight,
            reconstruction_kind=self.settings.reconstruction_loss,
        )
        self.record(parts.loss, parts.as_floats)
        return parts.loss


def _check_lengths(model: ModelSettings, settings: FinetuneSettings) -> None:
    for name in ("class_sampling", "class_weights"):
        values = getattr(settings, name)
        if len(values) != len(model.classes):
            raise ValueError(
                f"finetune.{name} has {len(values)} values for {len(model.classes)} classes "
                f"{model.classes}; give one value per class in model.classes order"
            )


def _check_resumable(checkpoint: Path, module: pl.LightningModule) -> None:
    """Refuse, with the fix, a checkpoint that other settings wrote into this folder."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    problem = state_mismatch(module, state["state_dict"])
    if problem is not None:
        raise ValueError(
            f"{checkpoint}: cannot resume, the checkpoint was written for other model settings "
            f"({problem}); use the settings of that run, or a new output folder to start over"
        )


def fit_resumable(
    module: StepLoggedModule,
    out_dir: Path,
    settings: TrainingRunSettings,
    sync_batchnorm: bool = False,
    storage: StorageSettings | None = None,
) -> pl.Trainer:
    """Fit `module` to settings.max_steps, resuming from <out>/checkpoints/last.ckpt when
    there is one; checkpoints every settings.checkpoint_every steps and at the end.
    With settings.checkpoint_uri, each checkpoint is also put there (through `storage`'s
    credentials for s3://), and a run without a local one resumes from it.

    Shared by fine-tuning and pretraining, so both resume, refuse foreign checkpoints and
    finish the same way.
    """
    checkpoints = Path(out_dir) / "checkpoints"
    last = checkpoints / LAST_CHECKPOINT
    uploading = None
    if settings.checkpoint_uri is not None:
        remote = RemoteCheckpoint(settings.checkpoint_uri, storage)
        if not last.is_file() and remote.fetch(last):
            pl.utilities.rank_zero_info(f"fetched the last checkpoint from {remote.uri}")
        uploading = UploadingCheckpointIO(remote, LAST_CHECKPOINT)
    trainer = pl.Trainer(
        max_steps=settings.max_steps,
        precision=resolve_precision(settings.precision),  # type: ignore[arg-type]
        strategy=settings.strategy,
        devices=settings.devices,
        accelerator="auto",
        sync_batchnorm=sync_batchnorm,  # applied by the distributed strategies only
        logger=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        default_root_dir=out_dir,
        plugins=uploading,
        callbacks=[
            pl.callbacks.ModelCheckpoint(
                dirpath=checkpoints,
                every_n_train_steps=settings.checkpoint_every,
                save_top_k=0,
                save_last=True,
                save_on_train_epoch_end=False,
                enable_version_counter=False,
            )
        ],
    )
    resume = last if last.is_file() else None
    if resume is not None:
        _check_resumable(resume, module)
    trainer.fit(module, ckpt_path=resume)
    if module.steps_run and trainer.global_step % settings.checkpoint_every:
        # The final state, when the callback did not just save it: the same call run again
        # then finds the run complete and trains nothing.
        trainer.save_checkpoint(last, weights_only=False)
    return trainer


def finetune(
    dataset_dir: Path,
    out_dir: Path,
    model: ModelSettings,
    settings: FinetuneSettings,
    log_metrics: MetricsLogger | None = None,
    encoder: Path | None = None,
    storage: StorageSettings | None = None,
) -> FinetuneResult:
    """Train (or resume training) and write <out>/checkpoints/last.ckpt and <out>/model.pt.

    `encoder` is an encoder weights file (the pretrain stage's) to start from; None starts
    from random weights. A resumed run takes its weights from the checkpoint instead.
    `storage`: credentials for settings.checkpoint_uri (fit_resumable).
    """
    _check_lengths(model, settings)
    out_dir = Path(out_dir)
    pl.seed_everything(settings.seed, verbose=False)
    network = build_model(model)
    if encoder is not None:
        load_encoder(network, encoder)
    module = FinetuneModule(
        network, load_train_split(dataset_dir, model.classes), model, settings, log_metrics
    )
    trainer = fit_resumable(module, out_dir, settings, storage=storage)
    module.recalibrate_batchnorm()
    weights = out_dir / WEIGHTS_FILE
    if trainer.is_global_zero:
        buffer = io.BytesIO()
        torch.save(network.state_dict(), buffer)
        atomic.write_bytes(weights, buffer.getvalue())
    images = module.steps_run * settings.batch_size * trainer.world_size
    images_per_second = images / module.seconds if module.seconds > 0 else 0.0
    if log_metrics is not None and trainer.is_global_zero:
        log_metrics(
            {
                "images_per_second": images_per_second,
                "train_seconds": module.seconds,
                "steps_run": float(module.steps_run),
            },
            trainer.global_step,
        )
    return FinetuneResult(
        checkpoint=out_dir / "checkpoints" / LAST_CHECKPOINT,
        weights=weights,
        steps=trainer.global_step,
        final_loss=module.last_loss,
        seconds=module.seconds,
        images_per_second=images_per_second,
        precision=str(trainer.precision),
    )
