"""What `drseg run` shows a person: a live table on a terminal, plain lines elsewhere, and
at the end where the pictures are."""

import io
import re
from pathlib import Path

from rich.console import Console

from drseg.run import LiveTable, PlainLines, _TaskLog, _where_to_look, stage_view

FINETUNE_LINES = (
    "INFO - Executing task \x1b[96m'finetune'\x1b[0m\n",
    "INFO step 30/300: loss 0.8123, 1.50 s/step, about 405 s left\n",
)


def test_not_a_terminal_gets_plain_lines_and_verbose_too() -> None:
    assert isinstance(stage_view(io.StringIO(), verbose=False), PlainLines)
    assert isinstance(stage_view(io.StringIO(), verbose=True), PlainLines)


def _rendered(view: LiveTable) -> str:
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(view._table())
    return out.getvalue()


def test_the_live_table_shows_each_stage_and_the_training_progress() -> None:
    terminal = io.StringIO()
    view = LiveTable(terminal)
    try:
        view.started("synth")
        view.finished("synth", "success", 1.25)
        tee = _TaskLog(io.StringIO(), terminal, False, {"finetune": "finetune"}, view)
        for line in FINETUNE_LINES:
            tee.write(line)
        shown = _rendered(view)
        assert re.search(r"synth\s+success\s+1\.2 s", shown)
        assert re.search(
            r"finetune\s+running\s+\d+\.\d s\s+\S+\s+step 30/300, about \d+ s left", shown
        )
        left = int(re.search(r"about (\d+) s left", shown)[1])  # type: ignore[index]
        assert left <= 405  # counts down from what the stage last said
        tee.write("INFO Task 'finetune' finished with status SUCCESS\n")
        shown = _rendered(view)
        assert re.search(r"finetune\s+success\s+\d+\.\d s\s+\S+\s+step 300/300", shown)
        assert "left" not in shown
    finally:
        view.close()
    assert tee.statuses == {"finetune": "success"}


def test_the_end_says_where_the_overlays_and_predictions_are(tmp_path: Path) -> None:
    evaluation = tmp_path / "evaluate"
    (evaluation / "overlays").mkdir(parents=True)
    evaluate = {"name": "evaluate", "outputs": {"evaluation": {"path": str(evaluation)}}}
    lines = _where_to_look(evaluate, {"predictions": str(tmp_path / "predictions")})
    assert lines[1] == "look at:"
    assert lines[2].startswith(f"  overlays     {evaluation / 'overlays'}  (")
    assert "legend" in lines[2]
    assert lines[3] == f"  report       {evaluation / 'report.md'}"
    assert lines[4].startswith(f"  predictions  {tmp_path / 'predictions'}  (")
    assert _where_to_look(None, {}) == []
