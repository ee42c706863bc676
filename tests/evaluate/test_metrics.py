import math

import numpy as np
import pytest

from drseg.evaluate.metrics import (
    PixelCurves,
    ThresholdedDice,
    combined,
    dice_iou,
    thresholds_tuple,
)

# The 2 x 3 example: sorted by score, T F F T F F. Precision at the two positives is 1/1
# (recall 1/2) and 2/4 (recall 2/2): AUPR = 1/2 * 1 + 1/2 * 1/2 = 0.75.
SCORES = np.array([[[0.9, 0.8, 0.3], [0.6, 0.2, 0.1]]])
TRUTH = np.array([[[True, False, True], [False, False, False]]])


def _curves(probs: np.ndarray, truth: np.ndarray, fov: np.ndarray | None = None) -> PixelCurves:
    curves = PixelCurves(("X",))
    curves.update(probs, truth, fov)
    return curves


def _dice_at(
    probs: np.ndarray, truth: np.ndarray, threshold: float, fov: np.ndarray | None = None
) -> tuple[float, float]:
    """Dataset-level Dice and IoU of one class thresholded at `threshold` (p >= t)."""
    scores = ThresholdedDice(("X",))
    scores.update(probs >= threshold, truth, fov)
    return scores.dice_iou("X")


def _lesions() -> np.ndarray:
    truth = np.zeros((1, 8, 8), bool)
    truth[0, 2:6, 3:7] = True  # 16 of 64 pixels
    return truth


def test_perfect_prediction_scores_one() -> None:
    truth = _lesions()
    curves = _curves(truth.astype(float), truth)
    assert curves.aupr("X") == 1.0
    assert _dice_at(truth.astype(float), truth, 0.5) == (1.0, 1.0)
    assert curves.best_threshold("X") == 0.5  # the whole gap ties; the edge nearest 0.5 wins


def test_inverted_prediction_scores_the_positive_share() -> None:
    truth = _lesions()
    curves = _curves(1.0 - truth, truth)
    assert curves.aupr("X") == pytest.approx(16 / 64)
    assert _dice_at(1.0 - truth, truth, 0.5) == (0.0, 0.0)


def test_hand_computed_two_by_three_example() -> None:
    curves = _curves(SCORES, TRUTH)
    assert curves.aupr("X") == pytest.approx(0.75)
    recall, precision, thresholds = curves.pr_curve("X")
    assert recall == pytest.approx([0.5, 0.5, 0.5, 1, 1, 1])
    assert precision == pytest.approx([1, 1 / 2, 1 / 3, 2 / 4, 2 / 5, 2 / 6])
    assert thresholds == pytest.approx([0.9, 0.8, 0.6, 0.3, 0.2, 0.1])
    # at 0.5: predicted 0.9, 0.8, 0.6 -> TP 1, FP 2, FN 1
    assert _dice_at(SCORES, TRUTH, 0.5) == pytest.approx((2 / 5, 1 / 4))


def test_pixels_outside_the_field_of_view_are_ignored() -> None:
    fov = np.array([[True, False, True], [True, True, True]])  # drops the 0.8 negative
    curves = _curves(SCORES, TRUTH, fov)
    assert curves.aupr("X") == pytest.approx(1 / 2 * 1 + 1 / 2 * 2 / 3)
    assert curves.positives("X") == 2
    assert curves.negative.sum() == 3


def test_tied_scores_count_as_one_threshold() -> None:
    curves = _curves(np.full((1, 1, 4), 0.5), np.array([[[True, False, False, False]]]))
    assert curves.aupr("X") == pytest.approx(0.25)


def test_a_class_with_no_positive_pixel_has_undefined_aupr() -> None:
    curves = PixelCurves(("A", "B"))
    truth = np.zeros((2, 2, 3), bool)
    truth[0, 0, 0] = True
    curves.update(np.full((2, 2, 3), 0.7), truth, None)
    assert curves.positives("B") == 0
    assert math.isnan(curves.aupr("B"))
    assert all(points.size == 0 for points in curves.pr_curve("B"))
    assert curves.aupr("A") == pytest.approx(1 / 6)


def test_empty_truth_and_empty_prediction_is_undefined_never_a_pass() -> None:
    empty = np.zeros((1, 4, 4), bool)
    dice, iou = _dice_at(np.full((1, 4, 4), 0.1), empty, 0.5)
    assert math.isnan(dice) and math.isnan(iou)
    assert _dice_at(np.full((1, 4, 4), 0.1), empty, 0.05) == (0.0, 0.0)  # false positives
    assert all(math.isnan(v) for v in dice_iou(0, 0, 0))
    assert dice_iou(0, 0, 0, empty=1.0) == (1.0, 1.0)  # agreement of two models: same answer
    scores = ThresholdedDice(("X",))
    scores.update(empty, empty, None)
    scores.update(empty, empty, None)
    assert math.isnan(scores.merged_dice())
    assert scores.excluded_empty == {"X": 2} and scores.empty_both == {"X": 2}


def test_threshold_tuning_finds_the_dice_optimum() -> None:
    # positives 0.9 x3, 0.35; negatives 0.7, 0.2 x5. Dice for thresholds in
    # (0.7, 0.9]: 6/7; (0.35, 0.7]: 6/8; (0.2, 0.35]: 8/9 (best); <= 0.2: 8/14.
    # The best interval's edge nearest 0.5 is 0.35.
    probs = np.array([[[0.9, 0.9, 0.9, 0.35, 0.7, 0.2, 0.2, 0.2, 0.2, 0.2]]])
    truth = np.array([[[True] * 4 + [False] * 6]])
    curves = _curves(probs, truth)
    assert curves.best_threshold("X") == pytest.approx(0.35)
    assert _dice_at(probs, truth, 0.35) == pytest.approx((8 / 9, 4 / 5))
    assert _dice_at(probs, truth, 0.8) == pytest.approx((6 / 7, 3 / 4))


def test_dataset_dice_sums_pixels_over_images() -> None:
    rng = np.random.default_rng(3)
    scores = ThresholdedDice(("A", "B"))
    tp = fp = fn = 0
    for _ in range(3):
        probs = rng.random((2, 10, 12))
        truth = rng.random((2, 10, 12)) < 0.2
        fov = rng.random((10, 12)) < 0.8
        pred = probs >= np.array([0.3, 0.6])[:, None, None]
        scores.update(pred, truth, fov)
        inside = pred[1] & fov
        tp += int((inside & truth[1]).sum())
        fp += int((inside & ~truth[1]).sum())
        fn += int((~pred[1] & truth[1] & fov).sum())
    assert scores.dice_iou("B") == pytest.approx((2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)))


def test_combined_curves_hold_every_pixel_of_their_parts() -> None:
    first, second = _curves(SCORES, TRUTH), _curves(SCORES[:, :1], TRUTH[:, :1])
    both = combined([first, second])
    assert both.positives("X") == 4 and int(both.negative.sum()) == 4 + 1
    assert first.positives("X") == 2  # the parts are left as they were
    with pytest.raises(ValueError, match="cannot join"):
        combined([first, PixelCurves(("Y",))])


def test_aupr_equals_sklearn_average_precision() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    bins = 1000
    curves = PixelCurves(("X",), bins=bins)
    scores, labels = [], []
    for _ in range(3):
        # bin centres, so that pixels share a bin exactly when they share a score
        probs = (rng.integers(0, bins, (1, 20, 30)) + 0.5) / bins
        truth = rng.random((1, 20, 30)) < probs * 0.3
        fov = rng.random((20, 30)) < 0.9
        curves.update(probs, truth, fov)
        scores.append(probs[0][fov])
        labels.append(truth[0][fov])
    expected = metrics.average_precision_score(np.concatenate(labels), np.concatenate(scores))
    assert curves.aupr("X") == pytest.approx(expected, abs=1e-12)


def test_per_image_dice_excludes_and_counts_empty_ground_truth() -> None:
    scores = ThresholdedDice(("A", "B"))
    truth = np.zeros((2, 4, 4), bool)
    pred = np.zeros((2, 4, 4), bool)
    truth[0, 0, :4] = True
    pred[0, 0, :2] = True
    pred[0, 1, :2] = True  # A: TP 2, FP 2, FN 2 -> 0.5
    pred[1, 3, 3] = True  # B: empty truth -> excluded, whatever is predicted
    scores.update(pred, truth, None)
    truth2 = np.zeros((2, 4, 4), bool)
    truth2[:, 2, :2] = True
    pred2 = np.zeros((2, 4, 4), bool)
    pred2[0, 2, :2] = True  # A: perfect -> 1.0; B: nothing found -> 0.0
    scores.update(pred2, truth2, None)
    assert scores.per_image["A"] == [0.5, 1.0]
    assert scores.per_image_mean("A") == 0.75
    assert scores.per_image["B"] == [0.0]
    assert scores.excluded_empty == {"A": 0, "B": 1}


def test_lesions_outside_the_fov_do_not_count_for_per_image_dice() -> None:
    scores = ThresholdedDice(("A",))
    truth = np.zeros((1, 3, 3), bool)
    truth[0, 0, 0] = True
    fov = np.ones((3, 3), bool)
    fov[0, 0] = False
    scores.update(np.zeros_like(truth), truth, fov)
    assert scores.excluded_empty == {"A": 1}
    assert math.isnan(scores.per_image_mean("A"))


def test_merged_dice_of_the_any_lesion_mask() -> None:
    truth = np.array([[[1, 0, 0], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]]], bool)
    pred = np.array([[[0, 0, 1], [0, 0, 0]], [[0, 1, 0], [0, 0, 0]]], bool)
    # unions: truth {(0,0), (0,1)}, prediction {(0,1), (0,2)} -> TP 1, FP 1, FN 1
    scores = ThresholdedDice(("A", "B"))
    scores.update(pred, truth, None)
    assert scores.merged_dice() == pytest.approx(2 / 4)
    assert scores.per_image == {"A": [0.0], "B": [pytest.approx(2 / 3)]}


def test_thresholds_must_cover_every_class() -> None:
    assert thresholds_tuple(("A", "B"), {"B": 0.2, "A": 0.4}) == (0.4, 0.2)
    with pytest.raises(ValueError, match=r"lack classes \['B'\]"):
        thresholds_tuple(("A", "B"), {"A": 0.4})
    with pytest.raises(ValueError, match=r"\{'B': 1.5\} are outside \[0, 1\]"):
        thresholds_tuple(("A", "B"), {"A": 0.4, "B": 1.5})


def test_mismatched_shapes_are_refused() -> None:
    curves = PixelCurves(("A", "B"))
    with pytest.raises(ValueError, match="C = 2 classes"):
        curves.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), None)
    with pytest.raises(ValueError, match="fov has shape"):
        curves.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="bins=70000"):
        PixelCurves(("A",), bins=70_000)
