"""Fine-tune losses: soft Dice + BCE per lesion class, plus weighted reconstruction.

Dice is computed per class over the whole batch (all patches' pixels together), not per
patch: most patches hold no pixel of a given class, and a per-patch Dice would be 0/0 for
them. BCE adds a per-pixel gradient that Dice lacks early in training when predictions are
near 0.5 everywhere.

Pretraining's contrastive loss, NT-Xent, is here too, next to the losses it precedes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)
from torch import Tensor

DICE_SMOOTH = 1.0
"""Added to numerator and denominator of every class's Dice. It keeps the loss defined for a
class absent from the batch (loss -> 0 as its predicted mass -> 0, instead of 0/0) and, being
one pixel's worth, barely moves the Dice of a class with hundreds of lesion pixels."""


@dataclass(frozen=True)
class LossParts:
    """The total loss (to backpropagate) and its components: loss = dice + bce + w * recon."""

    loss: Tensor
    dice: Tensor
    bce: Tensor
    reconstruction: Tensor

    def as_floats(self) -> dict[str, float]:
        """Detached values, named as they are logged."""
        return {
            "loss": float(self.loss.detach()),
            "dice_loss": float(self.dice.detach()),
            "bce_loss": float(self.bce.detach()),
            "recon_loss": float(self.reconstruction.detach()),
        }


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = DICE_SMOOTH) -> Tensor:
    """(B,C,H,W) logits and 0/1 targets -> (C,) 1 - soft Dice per class, over the batch."""
    probs = torch.sigmoid(logits.float())
    target = target.float()
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def bce_per_class(logits: Tensor, target: Tensor) -> Tensor:
    """(B,C,H,W) logits and 0/1 targets -> (C,) mean binary cross-entropy per class."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return bce.mean(dim=(0, 2, 3))


def reconstruction_loss(
    prediction: Tensor, target: Tensor, kind: Literal["l1", "mse"] = "l1"
) -> Tensor:
    """Mean absolute (l1) or squared (mse) error, in the normalised image space."""
    if kind == "l1":
        return F.l1_loss(prediction.float(), target.float())
    return F.mse_loss(prediction.float(), target.float())


def multitask_loss(
    logits: Tensor,
    masks: Tensor,
    class_weights: Sequence[float],
    reconstruction: Tensor | None = None,
    reconstruction_target: Tensor | None = None,
    reconstruction_weight: float = 0.0,
    reconstruction_kind: Literal["l1", "mse"] = "l1",
) -> LossParts:
    """Class-weighted mean of per-class Dice and BCE, plus weight x reconstruction loss.

    The class weights are normalised to sum to one, so they shift attention between classes
    without changing the scale of the loss (and so the learning rate that suits it).
    """
    if len(class_weights) != logits.shape[1]:
        raise ValueError(
            f"class_weights has {len(class_weights)} values but the model has "
            f"{logits.shape[1]} classes; give one weight per class in model.classes"
        )
    weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"class_weights {tuple(class_weights)}: weights must be >= 0 with a positive sum"
        )
    weights = weights / weights.sum()
    dice = (soft_dice_loss(logits, masks) * weights).sum()
    bce = (bce_per_class(logits, masks) * weights).sum()
    recon = logits.new_zeros((), dtype=torch.float32)
    if reconstruction is not None and reconstruction_target is not None:
        recon = reconstruction_loss(reconstruction, reconstruction_target, reconstruction_kind)
    return LossParts(dice + bce + reconstruction_weight * recon, dice, bce, recon)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent: (N, D) embeddings of two views of N photographs -> scalar loss.

    Over the 2N L2-normalised embeddings, each is scored against the other 2N - 1 by cosine
    similarity / temperature, and the loss is the mean cross-entropy of picking its own
    photograph's other view; the 2N - 2 other views are the negatives. Computed in fp32:
    bf16 similarities divided by a small temperature would round the logits coarsely.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"nt_xent needs two (N, D) tensors of one shape, got {z1.shape}, {z2.shape}"
        )
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = (z @ z.T) / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)
