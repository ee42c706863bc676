"""The evaluation gate: may this model be registered as a challenger?

Plain functions over the evaluate stage's metrics.json (see drseg.evaluate.report). Every
rule becomes one row of the verdict, so a failed gate says which rule failed and by how
much. A metric that was not computed (null or NaN, e.g. no lesion of a class in the split)
fails the rule that reads it: a gate must never pass because a number is missing.

The regression rule compares with @champion only when the champion was evaluated on the
same data (dataset hash and split); scores on other data are not comparable, and the row
says so instead of passing or failing on them.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, computed_field

from drseg.config import ClassMetric, GateSettings

_TOLERANCE = 1e-9
"""A value this close to its threshold counts as reaching it: champion - delta is computed
in floating point (0.75 - 0.05 is not 0.7), and such noise must not decide a promotion."""

_LABELS = {"merged_dice": "merged any-lesion Dice", "dice": "Dice", "aupr": "AUPR"}


class ChampionMetrics(TypedDict):
    """What the regression rule needs of @champion (drseg.registry.champion_metrics)."""

    version: str
    dataset_hash: str
    """Content hash of the dataset the champion's metrics were computed on."""
    metrics: dict[str, Any]
    """The champion's metrics.json."""


class GateRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    rule: str
    threshold: float | None
    """The value must be at least this; None where the rule did not apply."""
    value: float | None
    passed: bool | None
    """None: not applicable (the row explains why), which does not block the gate."""
    note: str = ""
    """Why a row failed or did not apply; empty for a plain pass."""


class GateVerdict(BaseModel):
    """Serialisable (model_dump_json / model_validate_json) to pass between pipeline steps."""

    model_config = ConfigDict(frozen=True)

    rows: tuple[GateRow, ...]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return all(row.passed is not False for row in self.rows)


def _number(value: Any) -> float | None:
    """A finite float, or None for null, NaN and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _at_least(rule: str, value: Any, threshold: float, missing: str) -> GateRow:
    number = _number(value)
    if number is None:
        return GateRow(
            rule=rule,
            threshold=threshold,
            value=None,
            passed=False,
            note=f"{missing}; a missing value fails its rule",
        )
    passed = number >= threshold - _TOLERANCE
    note = "" if passed else f"{number:.6g} is below {threshold:.6g}"
    return GateRow(rule=rule, threshold=threshold, value=number, passed=passed, note=note)


def _class_value(metrics: dict[str, Any], cls: str, metric: ClassMetric) -> tuple[Any, str]:
    """(value, why it is missing) of one lesion class's metric."""
    classes = metrics.get("classes", {})
    if cls not in classes:
        return None, (
            f"{cls} is not among the evaluated classes {sorted(classes)} (check the gate's "
            "class_minimums)"
        )
    return classes[cls].get(metric), (
        f"{cls} {_LABELS[metric]} is null (not computed, e.g. no {cls} lesion in the split)"
    )


def _main_rows(metrics: dict[str, Any], settings: GateSettings) -> list[GateRow]:
    if settings.metric == "merged_dice":
        value = metrics.get("merged", {}).get("dice")
        missing = "merged Dice is null (not computed)"
        return [_at_least(_LABELS["merged_dice"], value, settings.minimum, missing)]
    metric: ClassMetric = settings.metric
    label = f"every lesion class's {_LABELS[metric]}"
    classes = metrics.get("classes", {})
    if not classes:
        return [_at_least(label, None, settings.minimum, "metrics has no lesion classes")]
    rows = []
    for cls in classes:
        value, missing = _class_value(metrics, cls, metric)
        rows.append(_at_least(f"{cls} {_LABELS[metric]}", value, settings.minimum, missing))
    return rows


def _class_minimum_rows(metrics: dict[str, Any], settings: GateSettings) -> list[GateRow]:
    label = _LABELS[settings.class_metric]
    rows = []
    for cls, minimum in settings.class_minimums.items():
        value, missing = _class_value(metrics, cls, settings.class_metric)
        rows.append(_at_least(f"{cls} {label} (class minimum)", value, minimum, missing))
    return rows


def _not_applicable(rule: str, note: str) -> GateRow:
    return GateRow(rule=rule, threshold=None, value=None, passed=None, note=note)


def _regression_rows(
    metrics: dict[str, Any],
    settings: GateSettings,
    champion: ChampionMetrics | None,
    dataset_hash: str,
) -> list[GateRow]:
    delta = settings.max_regression
    if delta is None:
        return []
    label = _LABELS[settings.class_metric]
    summary = f"no class {label} drops more than {delta:g} below @champion"
    if champion is None:
        return [_not_applicable(summary, "not applicable: no @champion yet")]
    theirs, ours = champion["metrics"], metrics
    same_split = theirs.get("split") == ours.get("split")
    if champion["dataset_hash"] != dataset_hash or not same_split:
        return [
            _not_applicable(
                summary,
                "not applicable: champion evaluated on other data (dataset "
                f"{champion['dataset_hash'][:19]}, split {theirs.get('split')}; this "
                f"evaluation: {dataset_hash[:19]}, split {ours.get('split')})",
            )
        ]
    rows = []
    for cls in ours.get("classes", {}):
        rule = f"{cls} {label} vs @champion v{champion['version']} (max drop {delta:g})"
        before = _number(theirs.get("classes", {}).get(cls, {}).get(settings.class_metric))
        if before is None:
            note = f"not applicable: champion v{champion['version']} has no {cls} {label}"
            rows.append(_not_applicable(rule, note))
            continue
        value, missing = _class_value(ours, cls, settings.class_metric)
        rows.append(_at_least(rule, value, before - delta, missing))
    return rows


def evaluate_gate(
    metrics: dict[str, Any],
    settings: GateSettings,
    champion: ChampionMetrics | None,
    dataset_hash: str,
) -> GateVerdict:
    """Check `metrics` (metrics.json of the evaluation split) against every rule.

    `dataset_hash` is the content hash of the evaluated dataset; `champion` (None when there
    is none) is only compared with when it was evaluated on that same dataset and split.
    """
    return GateVerdict(
        rows=(
            *_main_rows(metrics, settings),
            *_class_minimum_rows(metrics, settings),
            *_regression_rows(metrics, settings, champion, dataset_hash),
        )
    )


def _cell(value: float | None) -> str:
    """Four decimals: a gate table must not show a failing 0.7996 as the threshold 0.800."""
    return "n/a" if value is None else f"{value:.4f}"


def _outcome(row: GateRow) -> str:
    if row.passed is None:
        return row.note
    if row.passed:
        return "pass"
    return f"**fail**: {row.note}"


def verdict_markdown(verdict: GateVerdict) -> str:
    """The verdict as a Markdown table, for the pipeline's Markdown artifact."""
    lines = [
        f"## Evaluation gate: {'passed' if verdict.passed else 'failed'}",
        "",
        "| rule | threshold | value | result |",
        "|---|---|---|---|",
    ]
    for row in verdict.rows:
        threshold = "n/a" if row.threshold is None else f"≥ {_cell(row.threshold)}"
        lines.append(f"| {row.rule} | {threshold} | {_cell(row.value)} | {_outcome(row)} |")
    return "\n".join(lines) + "\n"


def verdict_summary(verdict: GateVerdict) -> str:
    """One line for an MLflow tag: "passed (3 rules)" or the failed rules and why."""
    failed = [row for row in verdict.rows if row.passed is False]
    if failed:
        return "failed: " + "; ".join(f"{row.rule}: {row.note}" for row in failed)
    skipped = sum(row.passed is None for row in verdict.rows)
    checked = len(verdict.rows) - skipped
    extra = f", {skipped} not applicable" if skipped else ""
    return f"passed ({checked} rule{'s' if checked != 1 else ''}{extra})"
