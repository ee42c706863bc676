"""The lesion segmentation model: an smp U-Net with a second, reconstruction head.

Both heads read the SAME decoder output (the last, full-resolution decoder stage). The
reconstruction head is one 3x3 convolution, so it costs almost nothing and it pushes the
whole encoder-decoder, not a separate branch, to keep the local texture that lesions are
made of. A separate reconstruction decoder would double the decoder cost and leave the
segmentation decoder untouched by that signal.

Encoders come from segmentation-models-pytorch and are built with ``encoder_weights=None``:
nothing is downloaded; pretrained encoders come from our own pretraining stage as a file
(``save_encoder`` / ``load_encoder``).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.base.initialization import initialize_head
from torch import Tensor

from drseg import atomic
from drseg.config import ModelSettings
from drseg.errors import UserError

LESION_PRIOR = 0.01
"""Initial predicted lesion probability everywhere. Lesions cover ~1% of pixels or less
(DOMAIN.md); starting at 0.5 would spend the first steps of every run learning only that."""


class MultiTaskUNet(torch.nn.Module):
    """Segmentation logits (one channel per lesion class) and an optional RGB reconstruction."""

    def __init__(
        self,
        encoder: str = "resnet34",
        num_classes: int = 4,
        reconstruction: bool = True,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        self.encoder_name = encoder
        self.unet = smp.Unet(
            encoder_name=encoder,
            encoder_weights=None,
            classes=num_classes,
            decoder_channels=list(decoder_channels),
        )
        torch.nn.init.constant_(
            self.unet.segmentation_head[0].bias, math.log(LESION_PRIOR / (1 - LESION_PRIOR))
        )
        self.reconstruction_head: SegmentationHead | None = None
        if reconstruction:
            decoder_out = self.unet.segmentation_head[0].in_channels
            self.reconstruction_head = SegmentationHead(decoder_out, 3)
            initialize_head(self.reconstruction_head)

    @property
    def encoder(self) -> torch.nn.Module:
        """The smp encoder, shared by both heads; what pretraining trains and saves."""
        encoder: torch.nn.Module = self.unet.encoder
        return encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B,3,H,W) normalised images -> (B,C,H,W) logits, (B,3,H,W) reconstruction or None.

        Any H and W work (the decoder resizes to each skip connection); multiples of 32, the
        encoder's stride, need no resizing.
        """
        decoded = self.unet.decoder(self.unet.encoder(x))
        logits = self.unet.segmentation_head(decoded)
        if self.reconstruction_head is None:
            return logits, None
        return logits, self.reconstruction_head(decoded)


def build_model(settings: ModelSettings) -> MultiTaskUNet:
    """The model the settings describe; the reconstruction head exists iff its weight is > 0."""
    return MultiTaskUNet(
        encoder=settings.encoder,
        num_classes=len(settings.classes),
        reconstruction=settings.reconstruction_weight > 0,
        decoder_channels=settings.decoder_channels,
    )


def save_encoder(model: MultiTaskUNet, path: Path, meta: dict[str, Any]) -> None:
    """Write the encoder weights, its name and `meta` (plain JSON-like values) atomically."""
    buffer = io.BytesIO()
    torch.save(
        {"encoder": model.encoder.state_dict(), "encoder_name": model.encoder_name, "meta": meta},
        buffer,
    )
    atomic.write_bytes(Path(path), buffer.getvalue())


class WeightsFileError(UserError, ValueError):
    """A weights file that is unreadable or does not fit the model: the user's to fix (the
    message names the file and how), not a bug."""


def read_weights_file(path: Path, fix: str) -> Any:
    """torch.load a weights file (tensors and plain values only), with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsFileError(f"{path}: not a readable weights file ({exc}); {fix}") from exc


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:8])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > 8 else ''})" if keys else "none"


def state_mismatch(module: torch.nn.Module, state: dict[str, Tensor]) -> str | None:
    """What keeps `state` from loading strictly into `module`; None when every tensor fits."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key].shape
    )
    if not (missing or unexpected or reshaped):
        return None
    return (
        f"missing keys: {_key_list(missing)}; unexpected keys: {_key_list(unexpected)}; "
        f"wrong shapes: {_key_list(reshaped)}"
    )


def load_matching_state(
    module: torch.nn.Module, state: dict[str, Tensor], path: Path, fix: str
) -> None:
    """Load `state` (read from `path`) into `module` only if every key and shape matches."""
    problem = state_mismatch(module, state)
    if problem is not None:
        raise WeightsFileError(f"{path}: weights do not fit the model ({problem}); {fix}")
    module.load_state_dict(state, strict=True)


def load_encoder(model: MultiTaskUNet, path: Path) -> None:
    """Load encoder weights written by `save_encoder`; every tensor must match, or nothing loads."""
    fix = (
        "pass the encoder.pt the pretrain stage wrote, or set pretrain.enabled to false "
        "(random initialisation)"
    )
    payload = read_weights_file(path, fix)
    if not isinstance(payload, dict) or not {"encoder", "encoder_name"} <= payload.keys():
        raise WeightsFileError(
            f"{path}: not an encoder weights file (no 'encoder' and 'encoder_name' entries, "
            f"which save_encoder writes); {fix}"
        )
    if payload["encoder_name"] != model.encoder_name:
        raise WeightsFileError(
            f"{path}: weights are for encoder {payload['encoder_name']!r} but the model uses "
            f"{model.encoder_name!r}; set model.encoder to {payload['encoder_name']!r} or "
            f"pretrain a {model.encoder_name!r} encoder"
        )
    load_matching_state(model.encoder, payload["encoder"], path, f"re-run pretrain; {fix}")


def load_trained_model(weights: Path, model: ModelSettings, device: str = "cpu") -> MultiTaskUNet:
    """The network the fine-tune stage wrote to `weights` (model.pt), in eval mode on `device`."""
    network = build_model(model)
    fix = "pass the model.pt of a finetune run made with the same model settings"
    state = read_weights_file(weights, fix)
    if not isinstance(state, dict):
        raise WeightsFileError(f"{weights}: not a state_dict; {fix}")
    load_matching_state(network, state, Path(weights), fix)
    return network.to(device).eval()
