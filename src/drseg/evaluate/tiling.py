"""Sliding-window inference over a whole photograph, the way nnU-Net does it.

A photograph is larger than what the model saw in training (patches) and often larger than
what fits on a GPU at once, so it is cut into overlapping tiles. Predictions near a tile's
border see less context and are worse, so each tile's output is weighted by a Gaussian that
peaks at the tile centre; the weighted average hides the borders and leaves no seams.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, h, w) normalised float batch -> (B, C, h, w) segmentation logits; h, w % 32 == 0."""

SIZE_MULTIPLE = 32
"""U-Net encoders downsample five times: tile sides must be multiples of 2**5."""

_MIN_WEIGHT = 1e-3
"""Floor of the Gaussian weight (its peak is 1): keeps every pixel's weight sum well away
from zero, including image corners that only one tile's corner covers."""

_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))
"""Test-time augmentation: identity, horizontal, vertical, both (dims of a B,C,H,W batch)."""


def gaussian_weights(height: int, width: int) -> torch.Tensor:
    """(height, width) Gaussian with sigma = side / 8, peak 1, floored at _MIN_WEIGHT."""
    axes = []
    for side in (height, width):
        position = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
        axes.append(torch.exp(-(position**2) / (2 * (side / 8) ** 2)))
    weights = axes[0][:, None] * axes[1][None, :]
    return (weights / weights.max()).clamp_(min=_MIN_WEIGHT).float()


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering [0, length) exactly: the first at 0, the last flush
    with the end, the ones between evenly spaced at most tile * (1 - overlap) apart."""
    if length <= tile:
        return [0]
    step = max(1.0, tile * (1 - overlap))
    count = math.ceil((length - tile) / step) + 1
    spacing = (length - tile) / (count - 1)
    return [round(i * spacing) for i in range(count)]


def _padded_side(side: int, tile: int) -> int:
    return side if side >= tile else math.ceil(side / SIZE_MULTIPLE) * SIZE_MULTIPLE


def _check_logits(logits: torch.Tensor, batch: torch.Tensor) -> None:
    if logits.ndim != 4 or logits.shape[0] != batch.shape[0] or logits.shape[2:] != batch.shape[2:]:
        raise ValueError(
            f"logits_fn returned shape {tuple(logits.shape)} for a batch of shape "
            f"{tuple(batch.shape)}; it must return (B, C, h, w) logits at the input's size"
        )


def _batch_probabilities(logits_fn: LogitsFn, batch: torch.Tensor, tta_flips: bool) -> torch.Tensor:
    probs = []
    for dims in _FLIPS if tta_flips else _FLIPS[:1]:
        logits = logits_fn(batch.flip(dims))
        _check_logits(logits, batch)
        probs.append(torch.sigmoid(logits.float()).flip(dims))
    return torch.stack(probs).mean(dim=0)


def predict_probabilities(
    logits_fn: LogitsFn,
    image: torch.Tensor,
    tile_size: int,
    overlap: float,
    batch_size: int,
    tta_flips: bool,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-class probabilities (C, H, W), float32 in [0, 1], on the CPU, for one image.

    `image` is (3, H, W) as drseg.models.normalize.image_to_tensor returns it. A side shorter
    than `tile_size` is padded up to the next multiple of 32 and the tile shrinks to it, so
    small images cost no more than they must. Padding replicates the border pixels: a
    fundus photograph's border is the black surround, so this continues it for any padding
    width (reflection needs the image to be wider than the padding).

    Probabilities, not logits, are averaged, over overlapping tiles and over flips (as
    nnU-Net averages softmax outputs): a tile-border prediction with an extreme logit then
    moves the average by at most its weight, instead of dominating it, and the result is a
    probability by construction. Put a module in eval mode before passing it as logits_fn.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected (3, H, W)")
    if tile_size % SIZE_MULTIPLE:
        raise ValueError(
            f"tile_size {tile_size} is not a multiple of {SIZE_MULTIPLE}; the encoder needs "
            f"it: use e.g. {max(SIZE_MULTIPLE, tile_size // SIZE_MULTIPLE * SIZE_MULTIPLE)}"
        )
    height, width = image.shape[1:]
    padded_h, padded_w = _padded_side(height, tile_size), _padded_side(width, tile_size)
    tile_h, tile_w = min(tile_size, padded_h), min(tile_size, padded_w)
    with torch.inference_mode():
        padded = image.to(device, torch.float32)[None]
        if (padded_h, padded_w) != (height, width):
            padded = F.pad(padded, (0, padded_w - width, 0, padded_h - height), mode="replicate")
        weights = gaussian_weights(tile_h, tile_w).to(device)
        corners = [
            (top, left)
            for top in tile_starts(padded_h, tile_h, overlap)
            for left in tile_starts(padded_w, tile_w, overlap)
        ]
        weighted_sum: torch.Tensor | None = None
        weight_sum = torch.zeros((padded_h, padded_w), device=device)
        for first in range(0, len(corners), batch_size):
            chunk = corners[first : first + batch_size]
            batch = torch.cat([padded[:, :, t : t + tile_h, x : x + tile_w] for t, x in chunk])
            probs = _batch_probabilities(logits_fn, batch, tta_flips)
            if weighted_sum is None:
                weighted_sum = torch.zeros((probs.shape[1], padded_h, padded_w), device=device)
            for (top, left), tile_probs in zip(chunk, probs, strict=True):
                weighted_sum[:, top : top + tile_h, left : left + tile_w] += tile_probs * weights
                weight_sum[top : top + tile_h, left : left + tile_w] += weights
    assert weighted_sum is not None, "there is always at least one tile"
    # Divided outside inference mode, so the caller gets an ordinary tensor it may modify.
    # Every pixel's weighted sum is at most its weight sum, so the ratio stays in [0, 1].
    return (weighted_sum / weight_sum)[:, :height, :width].cpu()
