import math

import pytest
import torch

from drseg.train.losses import (
    DICE_SMOOTH,
    bce_per_class,
    multitask_loss,
    reconstruction_loss,
    soft_dice_loss,
)

BIG = 30.0  # a logit whose sigmoid is 1 - 1e-13


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_perfect_prediction_has_no_dice_or_bce_loss() -> None:
    target = torch.zeros(2, 4, 8, 8)
    target[0, 0, 2:4, 2:4] = 1
    target[1, 2, 5:, :3] = 1
    logits = (target * 2 - 1) * BIG
    assert torch.allclose(soft_dice_loss(logits, target), torch.zeros(4), atol=1e-6)
    assert torch.allclose(bce_per_class(logits, target), torch.zeros(4), atol=1e-6)


def test_dice_by_hand_over_the_whole_batch() -> None:
    # One class, two 1x2 images: p = (0.8, 0.2) with target (1, 0), p = (0.5, 0.5) with (1, 1).
    probs = torch.tensor([[[[0.8, 0.2]]], [[[0.5, 0.5]]]])
    target = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    logits = torch.log(probs / (1 - probs))
    intersection = 0.8 + 0.5 + 0.5
    total = (0.8 + 0.2 + 0.5 + 0.5) + 3
    expected = 1 - (2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1 - 4.6 / 6.0)


def test_bce_by_hand() -> None:
    logits = torch.tensor([[[[_logit(0.8), _logit(0.2)]]]])
    target = torch.tensor([[[[1.0, 1.0]]]])
    expected = -(math.log(0.8) + math.log(0.2)) / 2
    assert bce_per_class(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_class_weights_pick_and_mix_the_classes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = (torch.rand(2, 4, 8, 8) > 0.8).float()
    per_class = soft_dice_loss(logits, target) + bce_per_class(logits, target)

    only_he = multitask_loss(logits, target, (0.0, 1.0, 0.0, 0.0))
    assert only_he.loss.item() == pytest.approx(per_class[1].item(), abs=1e-6)

    weighted = multitask_loss(logits, target, (3.0, 1.0, 1.0, 1.0))
    expected = (3 * per_class[0] + per_class[1] + per_class[2] + per_class[3]) / 6
    assert weighted.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # Scaling all weights changes nothing: they are shares.
    scaled = multitask_loss(logits, target, (6.0, 2.0, 2.0, 2.0))
    assert scaled.loss.item() == pytest.approx(weighted.loss.item(), abs=1e-6)


def test_wrong_class_weights_are_refused() -> None:
    logits = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="3 values but the model has 4 classes"):
        multitask_loss(logits, logits, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive sum"):
        multitask_loss(logits, logits, (0.0, 0.0, 0.0, 0.0))


def test_reconstruction_loss_is_zero_for_identical_tensors_and_hand_computed_otherwise() -> None:
    image = torch.randn(2, 3, 4, 4)
    assert reconstruction_loss(image, image, "l1").item() == 0.0
    assert reconstruction_loss(image, image, "mse").item() == 0.0
    shifted = image + 0.5
    assert reconstruction_loss(shifted, image, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(shifted, image, "mse").item() == pytest.approx(0.25)


def test_total_is_dice_plus_bce_plus_weighted_reconstruction() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 8, 8)
    target = (torch.rand(2, 4, 8, 8) > 0.9).float()
    image = torch.randn(2, 3, 8, 8)
    parts = multitask_loss(
        logits, target, (1.0,) * 4, image + 0.2, image, reconstruction_weight=0.5
    )
    assert parts.reconstruction.item() == pytest.approx(0.2, abs=1e-6)
    assert parts.loss.item() == pytest.approx(parts.dice.item() + parts.bce.item() + 0.1, abs=1e-5)
    floats = parts.as_floats()
    assert set(floats) == {"loss", "dice_loss", "bce_loss", "recon_loss"}
    assert all(isinstance(value, float) for value in floats.values())
    without = multitask_loss(logits, target, (1.0,) * 4)
    assert without.reconstruction.item() == 0.0
    assert without.loss.item() == pytest.approx(parts.loss.item() - 0.1, abs=1e-5)
