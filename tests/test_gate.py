"""The evaluation gate on hand-written metrics.json contents, every verdict computed by hand."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from drseg.config import GateSettings
from drseg.gate import (
    ChampionMetrics,
    GateRow,
    GateVerdict,
    evaluate_gate,
    verdict_markdown,
    verdict_summary,
)

DATA = "sha256:" + "11" * 32
OTHER_DATA = "sha256:" + "22" * 32


def _metrics(
    merged: float | None = 0.85,
    split: str = "val",
    **dice: float | None,
) -> dict[str, Any]:
    """metrics.json as the evaluate stage writes it; SE has no lesion in the split, so its
    AUPR is null (and its Dice 1.0: nothing predicted, nothing there)."""
    classes: dict[str, dict[str, float | None]] = {
        "MA": {"aupr": 0.40, "dice": 0.45, "iou": 0.29, "threshold": 0.3},
        "HE": {"aupr": 0.65, "dice": 0.62, "iou": 0.45, "threshold": 0.4},
        "EX": {"aupr": 0.85, "dice": 0.80, "iou": 0.67, "threshold": 0.5},
        "SE": {"aupr": None, "dice": 1.0, "iou": 1.0, "threshold": 0.5},
    }
    for cls, value in dice.items():
        classes[cls]["dice"] = value
    return {"split": split, "dataset_hash": DATA, "classes": classes, "merged": {"dice": merged}}


def _champion(
    dataset_hash: str = DATA, split: str = "val", **dice: float | None
) -> ChampionMetrics:
    return ChampionMetrics(
        version="3", dataset_hash=dataset_hash, metrics=_metrics(split=split, **dice)
    )


def _outcomes(verdict: GateVerdict) -> list[tuple[str, float | None, float | None, bool | None]]:
    return [(row.rule, row.threshold, row.value, row.passed) for row in verdict.rows]


@pytest.mark.parametrize(
    ("merged", "passed"),
    [(0.85, True), (0.8, True), (0.7999, False), (0.0, False)],
)
def test_default_rule_is_merged_dice_of_at_least_0_8(merged: float, passed: bool) -> None:
    verdict = evaluate_gate(_metrics(merged=merged), GateSettings(), None, DATA)
    assert _outcomes(verdict) == [("merged any-lesion Dice", 0.8, merged, passed)]
    assert verdict.passed is passed


def test_a_failed_rule_says_by_how_much() -> None:
    [row] = evaluate_gate(_metrics(merged=0.7999), GateSettings(), None, DATA).rows
    assert row.note == "0.7999 is below 0.8"


@pytest.mark.parametrize("missing", [None, math.nan])
def test_a_null_or_nan_metric_fails_its_rule(missing: float | None) -> None:
    verdict = evaluate_gate(_metrics(merged=missing), GateSettings(), None, DATA)
    assert verdict.rows == (
        GateRow(
            rule="merged any-lesion Dice",
            threshold=0.8,
            value=None,
            passed=False,
            note="merged Dice is null (not computed); a missing value fails its rule",
        ),
    )
    assert not verdict.passed


def test_missing_merged_section_fails_too() -> None:
    metrics = _metrics()
    del metrics["merged"]
    assert not evaluate_gate(metrics, GateSettings(), None, DATA).passed


def test_a_per_lesion_metric_must_be_reached_by_every_class() -> None:
    settings = GateSettings(metric="aupr", minimum=0.5)
    verdict = evaluate_gate(_metrics(), settings, None, DATA)
    assert _outcomes(verdict) == [
        ("MA AUPR", 0.5, 0.40, False),
        ("HE AUPR", 0.5, 0.65, True),
        ("EX AUPR", 0.5, 0.85, True),
        ("SE AUPR", 0.5, None, False),
    ]
    assert verdict.rows[3].note == (
        "SE AUPR is null (not computed, e.g. no SE lesion in the split); a missing value "
        "fails its rule"
    )
    assert not verdict.passed

    dice = evaluate_gate(
        _metrics(MA=math.nan), GateSettings(metric="dice", minimum=0.4), None, DATA
    )
    assert _outcomes(dice)[0] == ("MA Dice", 0.4, None, False)
    assert [row.passed for row in dice.rows[1:]] == [True, True, True]

    no_classes = evaluate_gate({**_metrics(), "classes": {}}, settings, None, DATA)
    assert _outcomes(no_classes) == [("every lesion class's AUPR", 0.5, None, False)]


def test_class_minimums_are_checked_on_top_of_the_main_rule() -> None:
    settings = GateSettings(class_minimums={"ma": 0.45, "HE": 0.7, "OD": 0.1})
    assert settings.class_minimums == {"MA": 0.45, "HE": 0.7, "OD": 0.1}
    verdict = evaluate_gate(_metrics(), settings, None, DATA)
    assert _outcomes(verdict) == [
        ("merged any-lesion Dice", 0.8, 0.85, True),
        ("MA Dice (class minimum)", 0.45, 0.45, True),  # exactly at the minimum passes
        ("HE Dice (class minimum)", 0.7, 0.62, False),
        ("OD Dice (class minimum)", 0.1, None, False),
    ]
    assert verdict.rows[3].note.startswith(
        "OD is not among the evaluated classes ['EX', 'HE', 'MA', 'SE']"
    )

    by_aupr = GateSettings(class_metric="aupr", class_minimums={"EX": 0.8})
    assert _outcomes(evaluate_gate(_metrics(), by_aupr, None, DATA))[1] == (
        "EX AUPR (class minimum)",
        0.8,
        0.85,
        True,
    )


def test_no_class_may_regress_more_than_delta_against_the_champion() -> None:
    settings = GateSettings(max_regression=0.1)
    champion = _champion(MA=0.5, HE=0.8, EX=0.95, SE=1.0)
    ours = _metrics(MA=0.41, HE=0.7, EX=0.85, SE=0.0)
    verdict = evaluate_gate(ours, settings, champion, DATA)
    rows = verdict.rows[1:]
    assert [(row.rule, row.value, row.passed) for row in rows] == [
        ("MA Dice vs @champion v3 (max drop 0.1)", 0.41, True),  # 0.41 >= 0.5 - 0.1
        # 0.8 - 0.1 is 0.7000000000000001 in floating point; 0.7 still passes.
        ("HE Dice vs @champion v3 (max drop 0.1)", 0.7, True),
        ("EX Dice vs @champion v3 (max drop 0.1)", 0.85, True),
        ("SE Dice vs @champion v3 (max drop 0.1)", 0.0, False),
    ]
    assert [row.threshold for row in rows] == pytest.approx([0.4, 0.7, 0.85, 0.9])
    assert rows[3].note == "0 is below 0.9"
    assert not verdict.passed

    worse = evaluate_gate(_metrics(MA=0.39, HE=0.7, EX=0.85, SE=1.0), settings, champion, DATA)
    assert [row.passed for row in worse.rows[1:]] == [False, True, True, True]


def test_regression_rows_for_missing_values() -> None:
    settings = GateSettings(max_regression=0.05)
    champion = _champion(MA=None)
    verdict = evaluate_gate(_metrics(HE=None), settings, champion, DATA)
    ma, he = verdict.rows[1:3]
    assert (ma.passed, ma.note) == (None, "not applicable: champion v3 has no MA Dice")
    assert (he.passed, he.value) == (False, None)
    assert he.note.startswith("HE Dice is null")


def test_regression_rule_does_not_apply_without_a_comparable_champion() -> None:
    settings = GateSettings(max_regression=0.02)
    rule = "no class Dice drops more than 0.02 below @champion"
    cases = {
        "not applicable: no @champion yet": None,
        "not applicable: champion evaluated on other data (dataset sha256:222222222222, "
        "split val; this evaluation: sha256:111111111111, split val)": _champion(OTHER_DATA),
        "not applicable: champion evaluated on other data (dataset sha256:111111111111, "
        "split test; this evaluation: sha256:111111111111, split val)": _champion(split="test"),
    }
    for note, champion in cases.items():
        verdict = evaluate_gate(_metrics(), settings, champion, DATA)
        assert verdict.rows[1:] == (
            GateRow(rule=rule, threshold=None, value=None, passed=None, note=note),
        )
        assert verdict.passed  # a rule that does not apply does not block

    # Off by default: no row at all, whatever the champion scored.
    off = evaluate_gate(_metrics(), GateSettings(), _champion(MA=1.0), DATA)
    assert len(off.rows) == 1


def test_markdown_table() -> None:
    settings = GateSettings(class_minimums={"HE": 0.7}, max_regression=0.02)
    verdict = evaluate_gate(_metrics(merged=0.8123), settings, None, DATA)
    assert verdict_markdown(verdict) == (
        "## Evaluation gate: failed\n"
        "\n"
        "| rule | threshold | value | result |\n"
        "|---|---|---|---|\n"
        "| merged any-lesion Dice | ≥ 0.8000 | 0.8123 | pass |\n"
        "| HE Dice (class minimum) | ≥ 0.7000 | 0.6200 | **fail**: 0.62 is below 0.7 |\n"
        "| no class Dice drops more than 0.02 below @champion | n/a | n/a | "
        "not applicable: no @champion yet |\n"
    )
    passed = evaluate_gate(_metrics(), GateSettings(), None, DATA)
    assert verdict_markdown(passed).startswith("## Evaluation gate: passed\n")


def test_summary_is_one_line_for_a_tag() -> None:
    assert verdict_summary(evaluate_gate(_metrics(), GateSettings(), None, DATA)) == (
        "passed (1 rule)"
    )
    skipped = GateSettings(max_regression=0.02, class_minimums={"EX": 0.5})
    assert verdict_summary(evaluate_gate(_metrics(), skipped, None, DATA)) == (
        "passed (2 rules, 1 not applicable)"
    )
    failed = evaluate_gate(
        _metrics(merged=None), GateSettings(class_minimums={"HE": 0.7}), None, DATA
    )
    assert verdict_summary(failed) == (
        "failed: merged any-lesion Dice: merged Dice is null (not computed); a missing value "
        "fails its rule; HE Dice (class minimum): 0.62 is below 0.7"
    )


def test_verdict_round_trips_as_json_between_steps() -> None:
    verdict = evaluate_gate(_metrics(merged=0.5), GateSettings(max_regression=0.1), None, DATA)
    text = verdict.model_dump_json()
    assert '"passed":false' in text.replace(" ", "")
    assert GateVerdict.model_validate_json(text) == verdict


@pytest.mark.parametrize(
    "bad",
    [
        {"minimum": 1.2},
        {"metric": "iou"},
        {"class_minimums": {"MA": 1.5}},
        {"max_regression": -0.1},
        {"minimun": 0.8},
    ],
)
def test_settings_refuse_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GateSettings.model_validate(bad)
