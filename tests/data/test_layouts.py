import pytest

from drseg.data.layouts import (
    Listing,
    detect_layout,
    mask_folders,
    read_generic,
    read_idrid,
    read_unlabelled,
)
from drseg.data.validation import MASK_REJECTED

CLASSES = ("MA", "HE", "EX", "SE", "OD")
IMG = "A. Segmentation/1. Original Images/a. Training Set"
GT = "A. Segmentation/2. All Segmentation Groundtruths/a. Training Set"


def test_detect_layout() -> None:
    assert detect_layout([f"{IMG}/IDRiD_01.jpg"]) == "idrid"
    assert detect_layout(["images/a.png", "masks/MA/a.png"]) == "generic"
    assert detect_layout(["x/y/photo.jpg", "z.png"]) == "unlabelled"


def test_idrid_pairs_masks_by_name_and_records_missing_ones() -> None:
    keys = [
        f"{IMG}/IDRiD_01.jpg",
        f"{IMG}/IDRiD_02.jpg",
        f"{GT}/1. Microaneurysms/IDRiD_01_MA.tif",
        f"{GT}/1. Microaneurysms/IDRiD_02_MA.tif",
        f"{GT}/2. Haemorrhages/IDRiD_01_HE.tif",
        f"{GT}/5. Optic Disc/IDRiD_02_OD.tif",
        "ATTRIBUTION.md",
    ]
    listing = read_idrid(keys, CLASSES)
    assert [r.id for r in listing.records] == ["IDRiD_01", "IDRiD_02"]
    assert set(listing.records[0].masks) == {"MA", "HE"}
    assert set(listing.records[1].masks) == {"MA", "OD"}
    assert listing.problems == []
    assert [(f.path, f.reason) for f in listing.skipped] == [
        ("ATTRIBUTION.md", "outside the IDRiD image and ground-truth folders")
    ]


def test_idrid_classes_not_configured_are_skipped_by_name_not_lost() -> None:
    keys = [f"{IMG}/IDRiD_01.jpg", f"{GT}/5. Optic Disc/IDRiD_01_OD.tif"]
    listing = read_idrid(keys, ("MA",))
    assert listing.records[0].masks == {}
    (skipped,) = listing.skipped
    assert skipped.path == f"{GT}/5. Optic Disc/IDRiD_01_OD.tif"
    assert skipped.reason == "OD masks are not read: OD is not in ingest.classes"


def test_generic_orphan_mask_and_duplicate_id_are_problems() -> None:
    keys = [
        "images/a.png",
        "images/b.jpg",
        "images/b.png",
        "images/notes.txt",
        "masks/MA/a.png",
        "masks/MA/b.png",
        "masks/MA/ghost.png",
        "masks/ma/a.tif",
    ]
    listing = read_generic(keys, CLASSES)
    problems = {(p.id, p.path): p.problem for p in listing.problems}
    assert "mask without image" in problems[("ghost", "masks/MA/ghost.png")]
    assert problems[("b", "images/b.jpg")].startswith("duplicate id 'b': 2 images")
    assert problems[("b", "images/b.png")].startswith("duplicate id 'b'")
    assert "duplicate id 'b'" in problems[("b", "masks/MA/b.png")]
    assert problems[("notes", "images/notes.txt")] == "unsupported image type '.txt'"
    # two MA masks for "a" (masks/MA and masks/ma): ambiguous, so "a" is quarantined too
    assert "duplicate MA masks" in problems[("a", "masks/MA/a.png")]
    assert listing.records == []


def test_generic_valid_records_survive_next_to_bad_ones() -> None:
    keys = ["images/a.png", "images/c.png", "masks/HE/c.png", "masks/MA/z.png"]
    listing = read_generic(keys, CLASSES)
    assert [(r.id, r.masks) for r in listing.records] == [
        ("a", {}),
        ("c", {"HE": "masks/HE/c.png"}),
    ]
    assert [(p.id, p.path) for p in listing.problems] == [("z", "masks/MA/z.png")]
    assert "pairs with no photograph" in listing.problems[0].problem
    assert listing.rejected_masks == ["masks/MA/z.png"]


def test_unlabelled_takes_every_image_in_the_tree_but_no_mask() -> None:
    keys = ["a/1.jpg", "a/b/2.PNG", "readme.txt", "3.tif", "masks/HE/3.png", f"{GT}/x/3_MA.tif"]
    listing = read_unlabelled(keys)
    assert [r.id for r in listing.records] == ["3", "a__1", "a__b__2"]
    assert [(f.path, f.reason) for f in listing.skipped] == [
        ("readme.txt", "not a photograph (.txt)"),
        ("masks/HE/3.png", "a mask (in a mask folder), not a photograph"),
        (f"{GT}/x/3_MA.tif", "a mask (in a mask folder), not a photograph"),
    ]


def _out(listing: Listing) -> dict[str, list[str]]:
    """Quarantined photograph id -> the files quarantined with it."""
    lost: dict[str, list[str]] = {}
    for p in listing.problems:
        lost.setdefault(p.id, []).append(p.path)
    return lost


def _idrid_source(*masks: str) -> list[str]:
    """Photographs IDRiD_01..08 with a good MA mask each, plus `masks`."""
    keys = [f"{IMG}/IDRiD_{i:02d}.jpg" for i in range(1, 9)]
    keys += [f"{GT}/1. Microaneurysms/IDRiD_{i:02d}_MA.tif" for i in range(1, 9)]
    return keys + list(masks)


@pytest.mark.parametrize(
    ("mask", "owner", "problem"),
    [
        (f"{GT}/3. Hard Exudates/IDRiD_03_EX.jpg", "IDRiD_03", "lossy or unsupported mask type"),
        (f"{GT}/3. Hard Exudates/IDRiD_03-EX.tif", "IDRiD_03", "does not follow IDRiD_NN"),
        (f"{GT}/1. Microaneurysms/idrid_07_ma.tif", "IDRiD_07", "does not follow IDRiD_NN"),
        (f"{GT}/1. Microaneurysms/idrid_07_MA.tif", "IDRiD_07", "mask without image"),
        (f"{GT}/2. Haemorrhages/IDRiD_05_EX.tif", "IDRiD_05", "in folder '2. Haemorrhages'"),
        (f"{GT}/Bleeds/IDRiD_05_HE.tif", "IDRiD_05", "not a class folder of IDRiD"),
    ],
    ids=[
        "jpg-mask",
        "malformed-name",
        "case-mismatch",
        "case-mismatch-id",
        "wrong-folder",
        "unknown-folder",
    ],
)
def test_idrid_rejected_mask_takes_its_photograph_out(mask: str, owner: str, problem: str) -> None:
    """A photograph whose mask was refused would train as lesion-free for that class."""
    listing = read_idrid(_idrid_source(mask), CLASSES)
    assert owner not in [r.id for r in listing.records]
    assert len(listing.records) == 7
    lines = [p for p in listing.problems if p.id == owner]
    assert [p.path for p in lines] == [mask, f"{IMG}/{owner}.jpg"]
    assert problem in lines[0].problem and lines[0].fix
    assert lines[1].problem == MASK_REJECTED
    assert listing.rejected_masks == [mask]


@pytest.mark.parametrize(
    ("mask", "owner", "problem"),
    [
        ("masks/HE/b.jpg", "b", "lossy or unsupported mask type '.jpg'"),
        ("masks/Haemorrhages/b.png", "b", "unknown class folder 'masks/Haemorrhages/'"),
        ("masks/MA/B.png", "b", "mask without image: no photograph with id 'B'"),
        ("masks/b.png", "b", "mask not in a class folder"),
        ("masks/HE/extra/b.png", "b", "mask not in a class folder"),
    ],
    ids=["jpg-mask", "unknown-class-folder", "case-mismatch", "no-class-folder", "nested-mask"],
)
def test_generic_rejected_mask_takes_its_photograph_out(
    mask: str, owner: str, problem: str
) -> None:
    keys = ["images/a.png", "images/b.png", "masks/MA/a.png", "masks/MA/b.png", mask]
    listing = read_generic(keys, CLASSES)
    assert [r.id for r in listing.records] == ["a"]
    lines = [p for p in listing.problems if p.id == owner]
    assert [p.path for p in lines] == [mask, "images/b.png"]
    assert lines[0].problem.startswith(problem)
    assert lines[1].problem == MASK_REJECTED


def test_broken_mask_name_matching_several_photographs_takes_them_all_out() -> None:
    """'IDRiD_1_MA' could be IDRiD_1 or IDRiD_01 once digits are read loosely: neither is
    certain, so neither trains."""
    keys = [f"{IMG}/IDRiD_1.jpg", f"{IMG}/IDRiD_01.jpg", f"{IMG}/IDRiD_02.jpg"]
    keys.append(f"{GT}/1. Microaneurysms/IDRiD-1-MA.tif")
    listing = read_idrid(keys, CLASSES)
    assert [r.id for r in listing.records] == ["IDRiD_02"]
    assert sorted(_out(listing)) == ["IDRiD_01", "IDRiD_1"]


def test_mask_pairing_with_nothing_is_named() -> None:
    keys = ["images/a.png", "masks/MA/a.png", "masks/MA/zz_top.png", "masks/Foo/qq.png"]
    listing = read_generic(keys, CLASSES)
    assert [r.id for r in listing.records] == ["a"]
    problems = {p.path: p.problem for p in listing.problems}
    assert problems["masks/MA/zz_top.png"].endswith("it pairs with no photograph")
    assert problems["masks/Foo/qq.png"].endswith("it pairs with no photograph")


def test_nested_photograph_is_named_and_its_masks_are_not_called_orphans() -> None:
    keys = ["images/a.png", "images/left/b.png", "masks/MA/a.png", "masks/MA/b.png"]
    listing = read_generic(keys, CLASSES)
    assert [r.id for r in listing.records] == ["a"]
    problems = {p.path: p.problem for p in listing.problems}
    assert "photograph in a sub-folder of images/" in problems["images/left/b.png"]
    assert problems["masks/MA/b.png"].startswith("mask of images/left/b.png")


def test_nested_photograph_sharing_an_id_makes_the_pairing_uncertain() -> None:
    keys = ["images/a.png", "images/left/a.png", "masks/MA/a.png", "images/c.png"]
    listing = read_generic(keys, CLASSES)
    assert [r.id for r in listing.records] == ["c"]
    last = listing.problems[-1]
    assert (last.id, last.path, last.problem) == ("a", "images/a.png", MASK_REJECTED)
    assert "cannot be paired with certainty" in listing.problems[-2].problem


def test_files_outside_the_layout_are_named_with_a_reason() -> None:
    keys = ["images/a.png", "masks/MA/a.png", "labels/MA/a.png", "notes.txt"]
    listing = read_generic(keys, CLASSES)
    assert [(f.path, f.reason) for f in listing.skipped] == [
        ("labels/MA/a.png", "not under images/ or masks/<CLASS>/"),
        ("notes.txt", "not under images/ or masks/<CLASS>/"),
    ]


def test_mask_folders_name_where_masks_are_looked_for() -> None:
    assert mask_folders("generic", ("MA", "HE")) == ["masks/MA/<id>.png", "masks/HE/<id>.png"]
    assert mask_folders("idrid", ("SE",)) == [
        "A. Segmentation/2. All Segmentation Groundtruths/<split>/4. Soft Exudates/<id>_SE.tif"
    ]
