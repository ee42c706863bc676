import numpy as np

from drseg.classes import CLASS_COLOURS, LESION_CLASSES
from drseg.legend import LEGEND_HEIGHT, SWATCH, legend_strip, with_legend
from drseg.serving.client import overlay


def _swatches(strip: np.ndarray) -> dict[str, tuple[int, int]]:
    """Each class colour's (x0, x1) columns in the strip, from its pixels."""
    found = {}
    for cls in LESION_CLASSES:
        ys, xs = np.nonzero((strip == CLASS_COLOURS[cls]).all(axis=-1))
        assert len(xs) == SWATCH * SWATCH, f"{cls}: a {SWATCH}-px square of its colour"
        assert xs.max() - xs.min() == ys.max() - ys.min() == SWATCH - 1
        found[cls] = (int(xs.min()), int(xs.max()))
    return found


def test_the_legend_shows_each_class_colour_with_its_name_beside_it() -> None:
    strip = legend_strip(1024, LESION_CLASSES, "fill: prediction")
    assert strip.shape == (LEGEND_HEIGHT, 1024, 3)
    swatches = _swatches(strip)
    assert [swatches[c][0] for c in LESION_CLASSES] == sorted(s[0] for s in swatches.values())
    ink = (strip < 100).all(axis=-1)  # black text and square borders
    starts = [swatches[c][0] for c in LESION_CLASSES] + [1024]
    for cls, next_start in zip(LESION_CLASSES, starts[1:], strict=True):
        label = ink[:, swatches[cls][1] + 3 : next_start - 2]
        # "MA microaneurysms" is ~130 px of text, not just a code: the name is written out.
        assert np.ptp(np.nonzero(label.any(axis=0))[0]) > 80, cls
    assert ink[:, starts[-2] + 150 :].any(), "the note follows the last class"
    assert not ink[:, : starts[0] - 1].any()


def test_the_served_overlay_has_the_legend_under_the_photograph() -> None:
    rgb = np.full((60, 700, 3), (167, 81, 23), np.uint8)
    masks = np.zeros((4, 60, 700), bool)
    masks[2, 10:20, 10:20] = True  # EX
    picture = overlay(rgb, masks, LESION_CLASSES)
    assert picture.shape == (60 + LEGEND_HEIGHT, 700, 3)
    np.testing.assert_array_equal(
        picture[60:], legend_strip(700, LESION_CLASSES, "fill: predicted lesion")
    )
    assert (picture[:60][~masks[2]] == (167, 81, 23)).all()
    assert (picture[15, 15] != (167, 81, 23)).any()  # the exudate is filled


def test_with_legend_keeps_the_picture_above_the_strip() -> None:
    picture = np.zeros((5, 400, 3), np.uint8)
    combined = with_legend(picture, ("HE",))
    np.testing.assert_array_equal(combined[:5], picture)
    assert (combined[5:] == (CLASS_COLOURS["HE"])).all(axis=-1).sum() == SWATCH * SWATCH
