"""The synthetic generator: deterministic, IDRiD-shaped files, and lesions that look like
DOMAIN.md's (small, rare, defined by local contrast), since every other test trains on them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

import drseg.data.synthetic as synthetic
from drseg.data.synthetic import (
    SYNTH_CLASSES,
    SyntheticPhotograph,
    synth_photograph,
    write_synthetic_dataset,
)
from drseg.data.validation import check_fundus, check_mask
from drseg.preprocess import fov_mask

LESIONS = ("MA", "HE", "EX", "SE")
IDRID_FOLDERS = {
    "MA": "1. Microaneurysms",
    "HE": "2. Haemorrhages",
    "EX": "3. Hard Exudates",
    "SE": "4. Soft Exudates",
    "OD": "5. Optic Disc",
}
IMAGES = Path("A. Segmentation/1. Original Images/a. Training Set")
MASKS = Path("A. Segmentation/2. All Segmentation Groundtruths/a. Training Set")


def _photo(seed: int, i: int = 0, width: int = 256) -> SyntheticPhotograph:
    return synth_photograph(np.random.default_rng([seed, i]), width)


@pytest.fixture(scope="module")
def full_width() -> list[SyntheticPhotograph]:
    """Six photographs at 1024 px, the width DOMAIN.md's numbers are measured at."""
    return [_photo(11, i, 1024) for i in range(6)]


def _components(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """Areas of the 8-connected components of a mask."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return np.asarray(stats[1:n, cv2.CC_STAT_AREA], np.int32)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("width", "height"), [(256, 170), (333, 221), (1024, 680), (2048, 1360)])
def test_shapes_and_types(width: int, height: int) -> None:
    photo = _photo(1, width=width)
    assert photo.image.shape == (height, width, 3)
    assert photo.image.dtype == np.uint8
    assert photo.fov.shape == (height, width)
    assert photo.fov.dtype == bool
    assert set(photo.masks) == set(SYNTH_CLASSES)
    for mask in photo.masks.values():
        assert mask.shape == (height, width)
        assert mask.dtype == bool


def test_same_seed_same_photograph_other_seed_another() -> None:
    a, b, c = _photo(5), _photo(5), _photo(6)
    assert a.image.tobytes() == b.image.tobytes()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in SYNTH_CLASSES)
    assert np.array_equal(a.fov, b.fov)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.masks["MA"], c.masks["MA"])


def test_black_outside_fov_and_masks_inside(full_width: list[SyntheticPhotograph]) -> None:
    for photo in full_width:
        w = photo.fov.shape[1]
        assert photo.image[~photo.fov].max() <= 2
        # Centred circle of radius ~0.40 x width, cut flat at top and bottom.
        assert 0.37 * w < photo.fov.any(axis=0).sum() / 2 < 0.43 * w
        assert photo.fov[0].any() and photo.fov[-1].any()
        assert not photo.fov[:, 0].any() and not photo.fov[:, -1].any()
        assert photo.image[photo.fov].mean() > 60  # the retina itself is not dark
        for cls in SYNTH_CLASSES:
            assert not (photo.masks[cls] & ~photo.fov).any(), cls


def test_rgb_order_and_colours(full_width: list[SyntheticPhotograph]) -> None:
    """Orange-red retina, brighter yellow-orange disc: R > G > B, in RGB order."""
    for photo in full_width:
        retina = photo.image[photo.fov].mean(axis=0)
        disc = photo.image[photo.masks["OD"]].mean(axis=0)
        assert retina[0] > retina[1] > retina[2]
        assert 100 < retina[0] < 240
        assert disc[0] > disc[1] > disc[2]
        assert (disc > retina).all()


def test_one_optic_disc_of_the_right_size(full_width: list[SyntheticPhotograph]) -> None:
    for photo in full_width:
        areas = _components(photo.masks["OD"])
        assert len(areas) == 1
        assert 0.6 * 12300 < areas[0] < 1.5 * 12300
        for cls in LESIONS:
            assert not (photo.masks[cls] & photo.masks["OD"]).any(), cls


def test_lesions_are_small_and_rare(full_width: list[SyntheticPhotograph]) -> None:
    """Sizes and counts as in DOMAIN.md's table, with a wide margin."""
    areas: dict[str, list[int]] = {c: [] for c in LESIONS}
    counts: dict[str, list[int]] = {c: [] for c in LESIONS}
    for photo in full_width:
        for cls in LESIONS:
            found = _components(photo.masks[cls])
            areas[cls] += found.tolist()
            counts[cls].append(len(found))
        assert photo.masks["MA"].mean() < 0.01
        assert photo.masks["HE"].mean() < 0.05
        lesion = np.any([photo.masks[c] for c in LESIONS], axis=0)
        assert lesion.mean() < 0.06
        for i, a in enumerate(LESIONS):  # a pixel belongs to one lesion class at most
            for b in LESIONS[i + 1 :]:
                assert not (photo.masks[a] & photo.masks[b]).any(), (a, b)
    assert 8 <= np.median(areas["MA"]) <= 25
    assert max(areas["MA"]) < 150
    assert 40 <= np.median(areas["HE"]) <= 200
    assert 5 <= np.median(areas["EX"]) <= 30
    assert np.percentile(areas["EX"], 90) > 3 * np.median(areas["EX"])  # some large plaques
    assert 10 <= np.median(counts["MA"]) <= 100
    assert 5 <= np.median(counts["HE"]) <= 60
    assert 20 <= np.median(counts["EX"]) <= 250
    if areas["SE"]:
        assert 100 <= np.median(areas["SE"]) <= 2000


def _local_ratio(photo: SyntheticPhotograph, cls: str) -> npt.NDArray[np.float64]:
    """Mean colour inside the mask over mean colour in a lesion-free ring around it."""
    mask = photo.masks[cls]
    any_mask = np.any([photo.masks[c] for c in SYNTH_CLASSES], axis=0)
    near = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    ring = near & ~any_mask & photo.fov
    img = photo.image.astype(np.float64)
    return np.asarray(img[mask].mean(axis=0) / img[ring].mean(axis=0))


def test_lesions_differ_from_their_surroundings(full_width: list[SyntheticPhotograph]) -> None:
    """MA and HE darken the local background, EX and SE brighten it (green shows it most)."""
    seen_se = False
    for photo in full_width:
        for cls in ("MA", "HE"):
            ratio = _local_ratio(photo, cls)
            assert ratio[1] < 0.93 and ratio[0] < 0.98, (cls, ratio)
        ratio = _local_ratio(photo, "EX")
        assert ratio[1] > 1.1 and ratio[0] > 1.0, ratio
        if photo.masks["SE"].any():
            seen_se = True
            ratio = _local_ratio(photo, "SE")
            assert ratio[1] > 1.1, ratio
    assert seen_se


def test_lesion_colour_is_local_not_absolute(full_width: list[SyntheticPhotograph]) -> None:
    """No global green threshold isolates lesions: vessels, the rim and the shaded macula are
    darker than an average MA or HE, and the optic disc is brighter than an average EX."""
    for photo in full_width:
        lesion = np.any([photo.masks[c] for c in LESIONS], axis=0)
        green = photo.image[..., 1][photo.fov & ~lesion]
        for cls in ("MA", "HE"):
            assert photo.image[..., 1][photo.masks[cls]].mean() > np.percentile(green, 5), cls
        assert photo.image[..., 1][photo.masks["EX"]].mean() < np.percentile(green, 99.5)


def test_soft_exudates_in_some_photographs_only() -> None:
    present = [_photo(21, i).masks["SE"].any() for i in range(12)]
    assert 2 <= sum(present) <= 10


def test_too_small_width_is_refused() -> None:
    with pytest.raises(ValueError, match="width=32"):
        _photo(0, width=32)


def test_generic_layout(tmp_path: Path) -> None:
    ids = write_synthetic_dataset(tmp_path, n=3, seed=4, width=128, layout="generic")
    assert ids == ["synth_0000", "synth_0001", "synth_0002"]
    expected = set()
    for i, name in enumerate(ids):
        photo = _photo(4, i, 128)
        expected.add(f"images/{name}.png")
        bgr = cv2.imread(str(tmp_path / "images" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), photo.image)
        for cls in SYNTH_CLASSES:
            path = tmp_path / "masks" / cls / f"{name}.png"
            if photo.masks[cls].any():
                expected.add(f"masks/{cls}/{name}.png")
                saved = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                assert saved.dtype == np.uint8
                assert set(np.unique(saved).tolist()) <= {0, 255}
                assert np.array_equal(saved > 0, photo.masks[cls])
    assert _files(tmp_path) == expected  # no mask for an absent class, no temp files


def test_idrid_layout(tmp_path: Path) -> None:
    ids = write_synthetic_dataset(tmp_path, n=3, seed=8, width=128, layout="idrid")
    assert ids == ["IDRiD_01", "IDRiD_02", "IDRiD_03"]
    expected = set()
    for i, name in enumerate(ids):
        photo = _photo(8, i, 128)
        expected.add(f"{IMAGES.as_posix()}/{name}.jpg")
        with Image.open(tmp_path / IMAGES / f"{name}.jpg") as jpg:
            assert jpg.format == "JPEG" and jpg.mode == "RGB"
            rgb = np.asarray(jpg, np.int16)
        assert np.abs(rgb - photo.image).mean() < 3  # quality 95, RGB order kept
        for cls in SYNTH_CLASSES:
            key = f"{MASKS.as_posix()}/{IDRID_FOLDERS[cls]}/{name}_{cls}.tif"
            if not photo.masks[cls].any():
                continue
            expected.add(key)
            with Image.open(tmp_path / key) as tif:
                assert tif.format == "TIFF" and tif.mode == "P"
                assert (tif.getpalette() or [])[:6] == [0, 0, 0, 255, 0, 0]
                values = np.asarray(tif)
            assert set(np.unique(values).tolist()) == {0, 1}
            assert np.array_equal(values == 1, photo.masks[cls])
    assert _files(tmp_path) == expected


def test_photograph_i_does_not_depend_on_n(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "two", n=2, seed=9, width=96)
    write_synthetic_dataset(tmp_path / "four", n=4, seed=9, width=96)
    for key in _files(tmp_path / "two"):
        assert (tmp_path / "two" / key).read_bytes() == (tmp_path / "four" / key).read_bytes()
    assert len(list((tmp_path / "four" / "images").iterdir())) == 4


def test_idrid_names_get_three_digits_past_99(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the naming is under test here, so every photograph is the same small one."""
    photo = _photo(0, width=64)
    monkeypatch.setattr(synthetic, "synth_photograph", lambda rng, width: photo)
    ids = write_synthetic_dataset(tmp_path, n=100, seed=0, width=64, layout="idrid")
    assert ids[0] == "IDRiD_001" and ids[-1] == "IDRiD_100"
    assert (tmp_path / IMAGES / "IDRiD_100.jpg").is_file()
    assert (tmp_path / MASKS / "5. Optic Disc" / "IDRiD_100_OD.tif").is_file()


def test_photographs_and_masks_pass_ingests_plausibility_checks(
    full_width: list[SyntheticPhotograph],
) -> None:
    """Every test trains on these: ingest must never quarantine one as implausible."""
    for photo in full_width + [_photo(3, i) for i in range(4)]:
        fov = fov_mask(photo.image)
        height, width = fov.shape
        check_fundus(fov, (width, height), "synth", "synth.png")
        for cls in SYNTH_CLASSES:
            check_mask(photo.masks[cls], fov, cls, "synth", f"{cls}.png")
