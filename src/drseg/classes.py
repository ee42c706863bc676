"""The lesion classes, as one table: everything drseg knows per class lives in a row here.

Settings (drseg.config) take their class list, patch sampling shares and loss weights from
this table and check any list given in a settings file against it when the settings load,
so a mismatched class list fails in milliseconds, not after hours of pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LesionClass:
    code: str
    """The class as masks, metrics, the graph's output channels and the contract name it."""
    name: str
    folders: tuple[str, ...]
    """Ground-truth folder names that hold its masks (IDRiD's first)."""
    colour: tuple[int, int, int]
    """RGB in overlays, chosen to stand out on the red-orange fundus and from each other
    (exudates are yellow themselves, so theirs is cyan)."""
    sampling_share: float
    """How often a fine-tuning patch centred on a lesion centres on this class: the rare
    classes (MA, SE) get more than their ~0.1-0.2 % pixel share, or they are barely seen."""
    loss_weight: float
    """Weight of the class's Dice + BCE loss."""


LESION_TABLE: tuple[LesionClass, ...] = (
    LesionClass("MA", "microaneurysms", ("1. Microaneurysms",), (0, 220, 0), 0.35, 1.0),
    LesionClass("HE", "haemorrhages", ("2. Haemorrhages",), (40, 90, 255), 0.25, 1.0),
    LesionClass("EX", "hard exudates", ("3. Hard Exudates",), (0, 230, 255), 0.2, 1.0),
    LesionClass("SE", "soft exudates", ("4. Soft Exudates",), (255, 0, 255), 0.2, 1.0),
)

LESION_CLASSES: tuple[str, ...] = tuple(row.code for row in LESION_TABLE)
"""The four lesion classes the model segments, in channel order."""

CLASS_COLOURS: dict[str, tuple[int, int, int]] = {row.code: row.colour for row in LESION_TABLE}

OTHER_COLOUR = (255, 255, 255)
"""For a class outside the table (e.g. the optic disc)."""


def lesion_class(code: str) -> LesionClass:
    for row in LESION_TABLE:
        if row.code == code:
            return row
    raise KeyError(f"{code!r} is not a lesion class; the classes are {LESION_CLASSES}")
