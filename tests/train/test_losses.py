import math

import pytest
import torch

from drseg.train.losses import (
    DICE_SMOOTH,
    bce_per_class,
    multitask_loss,
    nt_xent,
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


# NT-Xent. Rows of z1 and z2 are the two views of one photograph; they are left unnormalised
# so that the test covers the L2 normalisation. Normalised, in the order [a1, a2, b1, b2]:
# a1 = (1, 0), a2 = (0, 1), b1 = (1, 1) / sqrt 2, b2 = (-1, 0).
Z1 = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
Z2 = torch.tensor([[3.0, 3.0], [-4.0, 0.0]])
R = 1 / math.sqrt(2)
COSINES = [
    [1.0, 0.0, R, -1.0],
    [0.0, 1.0, R, 0.0],
    [R, R, 1.0, -R],
    [-1.0, 0.0, -R, 1.0],
]
POSITIVE = [2, 3, 0, 1]
"""Each embedding's other view: a1 <-> b1, a2 <-> b2."""


def _nt_xent_by_hand(temperature: float) -> float:
    total = 0.0
    for i, row in enumerate(COSINES):
        others = [c / temperature for j, c in enumerate(row) if j != i]  # self left out
        log_softmax = row[POSITIVE[i]] / temperature - math.log(sum(map(math.exp, others)))
        total -= log_softmax
    return total / len(COSINES)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.1])
def test_nt_xent_by_hand(temperature: float) -> None:
    loss = nt_xent(Z1, Z2, temperature)
    assert loss.item() == pytest.approx(_nt_xent_by_hand(temperature), rel=1e-6)


def test_nt_xent_pairs_each_sample_with_its_other_view() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 6, 8, generator=generator)
    loss = nt_xent(z1, z2, 0.2)
    # Swapping the views, or reordering the photographs in both, keeps every pair.
    assert nt_xent(z2, z1, 0.2).item() == pytest.approx(loss.item(), rel=1e-6)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert nt_xent(z1[order], z2[order], 0.2).item() == pytest.approx(loss.item(), rel=1e-6)
    # Reordering one view breaks the pairs.
    assert abs(nt_xent(z1, z2[order], 0.2).item() - loss.item()) > 0.01
    # Cosine similarity: the embeddings' lengths do not matter.
    assert nt_xent(3 * z1, 0.25 * z2, 0.2).item() == pytest.approx(loss.item(), rel=1e-6)


def test_nt_xent_is_low_for_matching_views_and_high_for_swapped_ones() -> None:
    views = torch.eye(4)
    aligned = nt_xent(views, views, 0.1).item()
    # Each positive scores 1 / 0.1, the 6 negatives (the other rows, twice) score 0.
    assert aligned == pytest.approx(math.log1p(6 * math.exp(-10)), abs=1e-7)
    assert nt_xent(views, views[[1, 0, 3, 2]], 0.1).item() > 9


def test_nt_xent_refuses_unpaired_embeddings() -> None:
    with pytest.raises(ValueError, match=r"two \(N, D\) tensors of one shape"):
        nt_xent(torch.zeros(4, 8), torch.zeros(3, 8), 0.2)
