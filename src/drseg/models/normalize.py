"""The input contract of every model: RGB uint8 -> normalised float tensor, and back.

ImageNet statistics, the convention of segmentation-models-pytorch encoders. Training,
evaluation, export and serving all go through these two functions.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 RGB -> 3 x H x W float32, normalised."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of image_to_tensor (for reconstruction previews); clips to 0..255."""
    mean = torch.tensor(IMAGE_MEAN, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=tensor.device).view(3, 1, 1)
    rgb = (tensor.detach() * std + mean).clamp(0, 1).mul(255).round().byte()
    return rgb.permute(1, 2, 0).cpu().numpy()
