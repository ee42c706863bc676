"""The pretrain stage: SimCLR on unlabelled photographs, for the U-Net's encoder.

The encoder trained is the fine-tune model's own (`build_model(...).encoder`), so the weights
saved to <out>/encoder.pt load into it key for key. Its deepest feature map is pooled and
projected by an MLP; NT-Xent pulls the two views of a photograph together and pushes all
other views in the step apart. Under DDP the embeddings of every device are gathered, so
each view has the negatives of the global batch, and batch norm is synchronised (SimCLR's
"global BN"): with per-device statistics the encoder can tell its own device's views apart
by their batch statistics instead of their content.

As the fine-tune stage: one code path for the laptop and the cluster (device, precision and
strategy come from the settings), checkpoints every `checkpoint_every` steps in
<out>/checkpoints, and the same call run again resumes from last.ckpt. Tracking is a
callback (`log_metrics`); this module never imports MLflow or kfp.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from drseg.artifacts import ENCODER_FILE
from drseg.config import ModelSettings, PretrainSettings, StorageSettings
from drseg.data import dataset
from drseg.models.unet import build_model, save_encoder
from drseg.train.finetune import (
    MetricsLogger,
    StepLoggedModule,
    fit_resumable,
    learning_rate_factor,
)
from drseg.train.losses import nt_xent
from drseg.train.views import (
    Photograph,
    ViewPair,
    ViewPairStream,
    check_crop_size,
    load_photographs,
    render_pairs,
)

try:
    import pytorch_lightning as pl
except ImportError:  # the unified `lightning` distribution (as on the GPU machines)
    import lightning.pytorch as pl  # type: ignore[no-redef]


@dataclass(frozen=True)
class PretrainResult:
    encoder: Path
    """Encoder weights (<out>/encoder.pt), for drseg.models.unet.load_encoder."""
    steps: int
    """Global step reached, counting steps of the runs this one resumed."""
    final_loss: float
    seconds: float
    """Wall time of this call's training loop."""
    images_per_second: float
    """Views (two per photograph) per second in this call, over all devices."""
    precision: str
    """The arithmetic Lightning trained in ("bf16-mixed", "32-true", ...)."""


def projection_head(features: int, projection_dim: int) -> torch.nn.Sequential:
    """SimCLR's MLP: Linear-BN-ReLU-Linear; hidden width = the encoder's feature width."""
    return torch.nn.Sequential(
        torch.nn.Linear(features, features),
        torch.nn.BatchNorm1d(features),
        torch.nn.ReLU(inplace=True),
        torch.nn.Linear(features, projection_dim),
    )


def embed(encoder: torch.nn.Module, projection: torch.nn.Module, views: Tensor) -> Tensor:
    """(N, 3, S, S) views -> (N, projection_dim): deepest features, global average pool, MLP."""
    deepest: Tensor = encoder(views)[-1]
    embedded: Tensor = projection(deepest.mean(dim=(2, 3)))
    return embedded


def gathered_views(gathered: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """All devices' first and second views' embeddings from `all_gather` of [z1; z2].

    `gathered` is (world, 2n, D), or (2n, D) on one device (Lightning adds no axis then); the
    i-th first view and the i-th second view stay partners.
    """
    if gathered.dim() == 2:
        gathered = gathered[None]
    dim = gathered.shape[-1]
    return gathered[:, :n].reshape(-1, dim), gathered[:, n:].reshape(-1, dim)


class SimCLRModule(StepLoggedModule):
    """Encoder + projection head trained with NT-Xent on views rendered on the device."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        photographs: Sequence[Photograph],
        settings: PretrainSettings,
        log_metrics: MetricsLogger | None,
    ) -> None:
        super().__init__(settings.max_steps, log_metrics)
        # Channels-last, as in fine-tuning: it halves the time of bf16 convolutions on a GPU.
        self.encoder = encoder.to(memory_format=torch.channels_last)
        widths: tuple[int, ...] = encoder.out_channels  # type: ignore[assignment]
        self.projection = projection_head(widths[-1], settings.projection_dim)
        self.photographs = tuple(photographs)
        self.settings = settings

    def train_dataloader(self) -> DataLoader[ViewPair]:
        settings = self.settings
        # Called after a checkpoint is restored: the stream continues at the restored step.
        stream = ViewPairStream(
            self.photographs,
            settings.crop_size,
            settings.min_fov_fraction,
            (settings.seed, self.global_rank),
            self.global_step,
            settings.batch_size,
        )
        return DataLoader(
            stream,
            batch_size=settings.batch_size,
            num_workers=settings.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=settings.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: ViewPair, dataloader_idx: int) -> Tensor:
        """Render the views where the batch now is (the GPU), outside autocast: fp32 pixels."""
        views = render_pairs(batch, self.settings.crop_size)
        return views.contiguous(memory_format=torch.channels_last)

    def configure_optimizers(self) -> Any:
        settings = self.settings
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        factor = functools.partial(
            learning_rate_factor,
            warmup_steps=settings.warmup_steps,
            max_steps=settings.max_steps,
            schedule="cosine",
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_step(self, views: Tensor, batch_idx: int) -> Tensor:
        z = embed(self.encoder, self.projection, views)
        # sync_grads: each device's loss covers every device's views; the gradients reaching
        # the gathered copies flow back to the device that computed them.
        gathered = self.all_gather(z, sync_grads=True)
        assert isinstance(gathered, Tensor)  # a tensor in, a tensor out
        z1, z2 = gathered_views(gathered, len(views) // 2)
        loss = nt_xent(z1, z2, self.settings.temperature)
        self.record(loss, lambda: {"loss": float(loss.detach())})
        return loss


def pretrain_photographs(
    dataset_dirs: Sequence[Path], labelled_dir: Path | None, include_labelled: bool
) -> tuple[list[Photograph], list[str]]:
    """Every photograph of the pools, plus the labelled train split if `include_labelled`;
    and the dataset hashes of the folders read. Raises ValueError, with the fix, if none."""
    sources: list[tuple[Path, dataset.Split | None]] = [(Path(d), None) for d in dataset_dirs]
    if labelled_dir is not None and include_labelled:
        sources.append((Path(labelled_dir), "train"))
    photographs: list[Photograph] = []
    hashes: list[str] = []
    for root, split in sources:
        hashes.append(dataset.load_manifest(root).dataset_hash)
        photographs.extend(load_photographs(root, split))
    if not photographs:
        searched = ", ".join(
            f"{root} ({'all records' if split is None else 'split ' + split})"
            for root, split in sources
        )
        ignored = (
            f"; {labelled_dir} was left out (pretrain.include_labelled is false)"
            if labelled_dir is not None and not include_labelled
            else ""
        )
        raise ValueError(
            f"pretrain found no photograph in {searched or 'no dataset folder'}{ignored}; pass "
            "an unlabelled pool ingested (and CLAHE-enhanced) with `drseg ingest`, or a "
            "labelled dataset folder with a train split and pretrain.include_labelled: true"
        )
    return photographs, hashes


def pretrain(
    dataset_dirs: Sequence[Path],
    out_dir: Path,
    model: ModelSettings,
    settings: PretrainSettings,
    log_metrics: MetricsLogger | None = None,
    labelled_dir: Path | None = None,
    storage: StorageSettings | None = None,
) -> PretrainResult:
    """Train (or resume training) SimCLR and write <out>/encoder.pt.

    `dataset_dirs`: unlabelled pools, every record used. `labelled_dir`: a labelled dataset
    whose train split joins them when settings.include_labelled (never its val split, the
    evaluation data). Checkpoints go to <out>/checkpoints (and settings.checkpoint_uri, with
    `storage`'s credentials); the same call resumes from them.
    """
    check_crop_size(settings.crop_size)
    photographs, hashes = pretrain_photographs(
        dataset_dirs, labelled_dir, settings.include_labelled
    )
    out_dir = Path(out_dir)
    pl.seed_everything(settings.seed, verbose=False)
    network = build_model(model)
    module = SimCLRModule(network.encoder, photographs, settings, log_metrics)
    trainer = fit_resumable(module, out_dir, settings, sync_batchnorm=True, storage=storage)
    encoder = out_dir / ENCODER_FILE
    if trainer.is_global_zero:
        meta = {
            "pretrain": json.loads(settings.model_dump_json()),
            "dataset_hashes": hashes,
            "photographs": len(photographs),
            "steps": trainer.global_step,
            "final_loss": module.last_loss,
        }
        save_encoder(network, encoder, meta)
    views = module.steps_run * settings.batch_size * 2 * trainer.world_size
    images_per_second = views / module.seconds if module.seconds > 0 else 0.0
    if log_metrics is not None and trainer.is_global_zero:
        log_metrics(
            {
                "images_per_second": images_per_second,
                "train_seconds": module.seconds,
                "steps_run": float(module.steps_run),
            },
            trainer.global_step,
        )
    return PretrainResult(
        encoder=encoder,
        steps=trainer.global_step,
        final_loss=module.last_loss,
        seconds=module.seconds,
        images_per_second=images_per_second,
        precision=str(trainer.precision),
    )
