"""The evaluation gate: may this model be registered as a challenger?

Plain functions over the evaluate stage's metrics (drseg.evaluate.schema.Metrics). Every
rule becomes one row of the verdict, so a failed gate says which rule failed and by how
much. A metric that is undefined (None: e.g. a Dice with nothing to find and nothing found)
fails the rule that reads it: a gate must never pass because a number is missing.

The default rules: merged any-lesion Dice >= 0.8, a floor per lesion class (a model that
misses a whole class fails however good the others are), and no regression against
@champion: the champion's registered graph scored by the same code on the same photographs
in the same run (drseg.steps.evaluate_step), so the comparison holds however the data
changed since the champion was registered.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, computed_field

from drseg.config import ClassMetric, GateSettings
from drseg.evaluate.schema import Metrics, Number

_TOLERANCE = 1e-9
"""A value this close to its threshold counts as reaching it: champion - delta is computed
in floating point (0.75 - 0.05 is not 0.7), and such noise must not decide a promotion."""

_LABELS = {"merged_dice": "merged any-lesion Dice", "dice": "Dice", "aupr": "AUPR"}


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


def _at_least(rule: str, value: Number, threshold: float, missing: str) -> GateRow:
    if value is None:
        return GateRow(
            rule=rule,
            threshold=threshold,
            value=None,
            passed=False,
            note=f"{missing}; a missing value fails its rule",
        )
    passed = value >= threshold - _TOLERANCE
    note = "" if passed else f"{value:.6g} is below {threshold:.6g}"
    return GateRow(rule=rule, threshold=threshold, value=value, passed=passed, note=note)


def _class_value(metrics: Metrics, cls: str, metric: ClassMetric) -> tuple[Number, str]:
    """(value, why it is missing) of one lesion class's metric."""
    if cls not in metrics.classes:
        return None, (
            f"{cls} is not among the evaluated classes {sorted(metrics.classes)} (check the "
            "gate's class_minimums against model.classes)"
        )
    return getattr(metrics.classes[cls], metric), (
        f"{cls} {_LABELS[metric]} is undefined (no {cls} lesion in the split and none "
        f"predicted, or no lesion pixel for AUPR)"
    )


def _main_rows(metrics: Metrics, settings: GateSettings) -> list[GateRow]:
    if settings.metric == "merged_dice":
        missing = "merged Dice is undefined (no lesion in the split and none predicted)"
        return [_at_least(_LABELS["merged_dice"], metrics.merged.dice, settings.minimum, missing)]
    metric: ClassMetric = settings.metric
    if not metrics.classes:
        label = f"every lesion class's {_LABELS[metric]}"
        return [_at_least(label, None, settings.minimum, "metrics has no lesion classes")]
    rows = []
    for cls in metrics.classes:
        value, missing = _class_value(metrics, cls, metric)
        rows.append(_at_least(f"{cls} {_LABELS[metric]}", value, settings.minimum, missing))
    return rows


def _class_minimum_rows(metrics: Metrics, settings: GateSettings) -> list[GateRow]:
    label = _LABELS[settings.class_metric]
    rows = []
    for cls, minimum in settings.class_minimums.items():
        value, missing = _class_value(metrics, cls, settings.class_metric)
        rows.append(_at_least(f"{cls} {label} (class floor)", value, minimum, missing))
    return rows


def _not_applicable(rule: str, note: str) -> GateRow:
    return GateRow(rule=rule, threshold=None, value=None, passed=None, note=note)


def _check_comparable(metrics: Metrics, champion: Metrics) -> None:
    """The champion must have been scored on the same photographs, the same way."""
    ours = (metrics.dataset_hash, metrics.split, metrics.images, metrics.scored)
    theirs = (champion.dataset_hash, champion.split, champion.images, champion.scored)
    if ours != theirs:
        raise ValueError(
            f"the champion's metrics (dataset {champion.dataset_hash[:19]}, split "
            f"{champion.split}, {champion.images} images, {champion.scored}) were not computed "
            f"on the challenger's photographs (dataset {metrics.dataset_hash[:19]}, split "
            f"{metrics.split}, {metrics.images} images, {metrics.scored}); pass the champion/ "
            f"metrics that `drseg evaluate` wrote beside the challenger's"
        )


def _regression_rows(
    metrics: Metrics, settings: GateSettings, champion: Metrics | None, no_champion: str
) -> list[GateRow]:
    delta = settings.max_regression
    if delta is None:
        return []
    label = _LABELS[settings.class_metric]
    if champion is None:
        summary = f"no class {label} or merged Dice more than {delta:g} below @champion"
        return [_not_applicable(summary, f"not applicable: {no_champion}")]
    _check_comparable(metrics, champion)
    version = "@champion" + (
        "" if champion.model_version is None else f" v{champion.model_version}"
    )
    compared: list[tuple[str, Number, Number, str]] = [
        (
            f"{cls} {label}",
            getattr(champion.classes[cls], settings.class_metric)
            if cls in champion.classes
            else None,
            *_class_value(metrics, cls, settings.class_metric),
        )
        for cls in metrics.classes
    ]
    compared.append(
        (
            _LABELS["merged_dice"],
            champion.merged.dice,
            metrics.merged.dice,
            "merged Dice is undefined",
        )
    )
    rows = []
    for name, before, value, missing in compared:
        rule = f"{name} vs {version} (max drop {delta:g})"
        if before is None:
            rows.append(_not_applicable(rule, f"not applicable: {version} has no {name} here"))
        else:
            rows.append(_at_least(rule, value, before - delta, missing))
    return rows


def evaluate_gate(
    metrics: Metrics,
    settings: GateSettings,
    champion: Metrics | None,
    no_champion: str = "no @champion yet",
) -> GateVerdict:
    """Check `metrics` against every rule; `champion` is @champion's graph scored on the same
    photographs (None: there is none to compare with, and `no_champion` says why).
    ValueError when the two were not scored on the same photographs: then the gate cannot
    decide."""
    return GateVerdict(
        rows=(
            *_main_rows(metrics, settings),
            *_class_minimum_rows(metrics, settings),
            *_regression_rows(metrics, settings, champion, no_champion),
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
