from drseg.data.layouts import detect_layout, read_generic, read_idrid, read_unlabelled

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
    assert listing.ignored == ["ATTRIBUTION.md"]


def test_idrid_classes_not_configured_are_ignored_not_lost() -> None:
    keys = [f"{IMG}/IDRiD_01.jpg", f"{GT}/5. Optic Disc/IDRiD_01_OD.tif"]
    listing = read_idrid(keys, ("MA",))
    assert listing.records[0].masks == {}
    assert listing.ignored == [f"{GT}/5. Optic Disc/IDRiD_01_OD.tif"]


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
    keys = ["images/a.png", "images/c.png", "masks/HE/c.png", "masks/XX/c.png", "masks/MA/z.png"]
    listing = read_generic(keys, CLASSES)
    assert [(r.id, r.masks) for r in listing.records] == [
        ("a", {}),
        ("c", {"HE": "masks/HE/c.png"}),
    ]
    assert [p.id for p in listing.problems] == ["z"]
    assert listing.ignored == ["masks/XX/c.png"]


def test_unlabelled_takes_every_image_in_the_tree() -> None:
    listing = read_unlabelled(["a/1.jpg", "a/b/2.PNG", "readme.txt", "3.tif"])
    assert [r.id for r in listing.records] == ["3", "a__1", "a__b__2"]
    assert listing.ignored == ["readme.txt"]
