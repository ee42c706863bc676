"""Ingest on generated data: every bad-input case quarantines exactly one thing with the
problem named, and every valid record still comes out."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from drseg.config import IngestSettings
from drseg.data import dataset
from drseg.data.ingest import (
    IngestError,
    assign_splits,
    format_summary,
    ingest,
    source_fingerprint,
)
from drseg.data.validation import MASK_REJECTED
from drseg.preprocess import resize_mask

SETTINGS = IngestSettings(working_width=128, workers=1)


@pytest.fixture
def source(synthetic_generic: Path, tmp_path: Path) -> Path:
    """A writable copy of the six-photograph generic dataset."""
    return Path(shutil.copytree(synthetic_generic, tmp_path / "source"))


def _ids(out: Path) -> list[str]:
    return [r.id for r in dataset.load_manifest(out).records]


def _quarantine(out: Path) -> dict[str, list[str]]:
    by_path: dict[str, list[str]] = {}
    for entry in json.loads((out / dataset.QUARANTINE).read_text()):
        by_path.setdefault(Path(entry["path"]).name, []).append(entry["problem"])
    return by_path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_clean_source_gives_every_record(source: Path, tmp_path: Path) -> None:
    result = ingest(source, tmp_path / "out", SETTINGS)
    out = tmp_path / "out"
    assert _ids(out) == [f"synth_{i:04d}" for i in range(6)]
    assert result.quarantined == []
    record = result.manifest.records[0]
    assert record.size == (128, 85) and record.source_size == (256, 170)
    image = dataset.read_rgb(dataset.image_path(out, record.id))
    assert image.shape == (85, 128, 3)
    fov = dataset.read_mask(dataset.fov_path(out, record.id))
    assert 0.4 < fov.mean() < 0.9
    for cls, entry in record.masks.items():
        mask = dataset.read_mask(dataset.mask_path(out, cls, record.id))
        assert mask.sum() == entry.pixels
    summary = json.loads((out / dataset.SUMMARY).read_text())
    assert summary["records"] == 6 and summary["quarantined"] == 0
    assert summary["masks"]["OD"] == 6


@pytest.mark.parametrize(
    ("damage", "bad_file", "problem"),
    [
        (
            lambda s: (s / "images/synth_0001.png").write_bytes(
                (s / "images/synth_0001.png").read_bytes()[:2000]
            ),
            "synth_0001.png",
            "unreadable or truncated image",
        ),
        (
            lambda s: (s / "images/synth_0002.png").write_bytes(b"not an image at all"),
            "synth_0002.png",
            "unreadable image",
        ),
        (
            lambda s: cv2.imwrite(
                str(s / "masks/OD/synth_0003.png"), np.zeros((100, 100), np.uint8)
            ),
            "synth_0003.png",
            "mask is 100x100 but its image is 256x170",
        ),
        (
            lambda s: cv2.imwrite(
                str(s / "masks/OD/synth_0004.png"),
                np.tile(np.arange(256, dtype=np.uint8), (170, 1)),
            ),
            "synth_0004.png",
            "mask is not binary: 256 distinct values (0, 1, 2, 3, 4, ...)",
        ),
        (
            lambda s: cv2.imwrite(str(s / "masks/HE/orphan.png"), np.zeros((170, 256), np.uint8)),
            "orphan.png",
            "mask without image: no photograph with id 'orphan'",
        ),
        (
            lambda s: (s / "images/synth_0005.jpg").write_bytes(b"x"),
            "synth_0005.jpg",
            "duplicate id 'synth_0005': 2 images share it",
        ),
        (
            lambda s: (s / "images/huge.png").write_bytes(_png_header_only(100_000, 80_000)),
            "huge.png",
            "image is 100000x80000 (8000 MP), over the limit of 60 MP; refused before decoding",
        ),
    ],
    ids=["truncated", "garbage", "mask-size", "non-binary", "orphan-mask", "duplicate", "huge"],
)
def test_bad_record_is_quarantined_and_nothing_valid_is_lost(
    source: Path, tmp_path: Path, damage: object, bad_file: str, problem: str
) -> None:
    damage(source)  # type: ignore[operator]
    result = ingest(source, tmp_path / "out", SETTINGS)
    quarantined = _quarantine(tmp_path / "out")
    assert any(p.startswith(problem) for p in quarantined[bad_file]), quarantined
    bad_ids = {p.id for p in result.quarantined}
    expected = [f"synth_{i:04d}" for i in range(6) if f"synth_{i:04d}" not in bad_ids]
    assert _ids(tmp_path / "out") == expected
    assert len(bad_ids) == 1
    photographs = {p.stem for p in (source / "images").iterdir()}
    assert result.summary["quarantined"] == len(bad_ids & photographs)


def test_problem_in_a_mask_quarantines_its_photograph_too(source: Path, tmp_path: Path) -> None:
    cv2.imwrite(str(source / "masks/OD/synth_0003.png"), np.zeros((10, 10), np.uint8))
    result = ingest(source, tmp_path / "out", SETTINGS)
    paths = sorted(Path(p.path).relative_to(source).as_posix() for p in result.quarantined)
    assert paths == ["images/synth_0003.png", "masks/OD/synth_0003.png"]
    assert result.summary["quarantined_with_masks"] == 1
    assert "synth_0003" not in _ids(tmp_path / "out")
    assert not dataset.image_path(tmp_path / "out", "synth_0003").exists()


def test_greyscale_and_16_bit_are_converted_and_reported(source: Path, tmp_path: Path) -> None:
    rgb = dataset.read_rgb(source / "images/synth_0000.png")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(source / "images/synth_0000.png"), grey)
    deep = cv2.cvtColor(dataset.read_rgb(source / "images/synth_0001.png"), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(source / "images/synth_0001.png"), deep.astype(np.uint16) * 257)
    result = ingest(source, tmp_path / "out", SETTINGS)
    notes = {r.id: r.notes for r in result.manifest.records}
    assert notes["synth_0000"] == ("greyscale converted to RGB",)
    assert notes["synth_0001"] == ("16-bit converted to 8-bit",)
    assert notes["synth_0002"] == ()
    assert result.summary["converted"] == 2
    converted = dataset.read_rgb(dataset.image_path(tmp_path / "out", "synth_0001"))
    assert converted.dtype == np.uint8 and converted.max() > 100


def test_rgba_palette_and_rgb_masks_are_read_as_binary(source: Path, tmp_path: Path) -> None:
    mask = dataset.read_mask(source / "masks/OD/synth_0000.png")
    reference = ingest(source, tmp_path / "ref", SETTINGS).manifest.records[0]
    assert reference.masks["OD"].pixels > 0
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (255, 0, 0, 255)
    rgba[..., 3] = np.where(mask, 255, 7)  # alpha drawing the same shape as the colour
    (source / "masks/OD/synth_0000.png").unlink()
    Image.fromarray(rgba, "RGBA").save(source / "masks/OD/synth_0000.tif")
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert result.quarantined == []
    record = next(r for r in result.manifest.records if r.id == "synth_0000")
    stored = dataset.read_mask(dataset.mask_path(tmp_path / "out", "OD", "synth_0000"))
    expected = resize_mask(mask, record.size)
    assert record.masks["OD"].pixels == expected.sum() > 0
    assert np.array_equal(stored, expected)


def test_too_few_valid_records_fails_with_the_report(source: Path, tmp_path: Path) -> None:
    for path in (source / "images").iterdir():
        path.write_bytes(b"broken")
    settings = SETTINGS.model_copy(update={"min_records": 2})
    with pytest.raises(IngestError, match="only 0 valid records"):
        ingest(source, tmp_path / "out", settings)
    report = json.loads((tmp_path / "out" / dataset.QUARANTINE).read_text())
    assert len({entry["id"] for entry in report}) == 6
    assert not (tmp_path / "out" / dataset.MANIFEST).exists()


def test_failed_ingest_leaves_an_output_folder_the_same_command_accepts(
    source: Path, synthetic_generic: Path, tmp_path: Path
) -> None:
    """The failure report must not block the re-run once the source is fixed."""
    for path in (source / "images").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(IngestError):
        ingest(source, tmp_path / "out", SETTINGS)
    assert (tmp_path / "out" / dataset.QUARANTINE).exists()
    shutil.rmtree(source / "images")
    shutil.copytree(synthetic_generic / "images", source / "images")
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert result.summary["records"] == 6
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "fov",
        "images",
        "manifest.json",
        "masks",
        "quarantine.json",
        "summary.json",
    ]


def test_non_empty_output_is_refused(source: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        ingest(source, tmp_path / "out", SETTINGS)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_hash_depends_on_content_and_parameters_only(source: Path, tmp_path: Path) -> None:
    first = ingest(source, tmp_path / "a", SETTINGS).manifest.dataset_hash
    moved = Path(shutil.copytree(source, tmp_path / "elsewhere"))
    parallel = SETTINGS.model_copy(update={"workers": 2})
    assert ingest(moved, tmp_path / "b", parallel).manifest.dataset_hash == first
    wider = SETTINGS.model_copy(update={"working_width": 160})
    assert ingest(source, tmp_path / "c", wider).manifest.dataset_hash != first
    mask = dataset.read_mask(source / "masks/OD/synth_0002.png")
    mask[0, 0] = ~mask[0, 0]
    dataset.write_mask(source / "masks/OD/synth_0002.png", mask)
    assert ingest(source, tmp_path / "d", SETTINGS).manifest.dataset_hash != first


def test_fingerprint_changes_with_any_file_and_only_then(source: Path) -> None:
    """What ingest is cached on in the pipeline: read from the listing, no file opened."""
    first = source_fingerprint(source)
    assert source_fingerprint(source) == first
    photo = next((source / "images").iterdir())
    photo.write_bytes(photo.read_bytes() + b"\0")
    rewritten = source_fingerprint(source)
    assert rewritten != first
    (source / "images" / "new.jpg").write_bytes(b"x")
    added = source_fingerprint(source)
    assert added not in (first, rewritten)
    (source / "images" / "new.jpg").unlink()
    assert source_fingerprint(source) == rewritten


def test_idrid_layout_on_generated_data(synthetic_idrid: Path, tmp_path: Path) -> None:
    result = ingest(synthetic_idrid, tmp_path / "out", SETTINGS)
    assert result.summary["layout"] == "idrid"
    assert _ids(tmp_path / "out") == ["IDRiD_01", "IDRiD_02", "IDRiD_03", "IDRiD_04"]
    assert result.summary["masks"]["OD"] == 4
    assert result.quarantined == []


def test_split_is_seeded_stratified_and_order_free() -> None:
    strata = {f"r{i}": frozenset({"MA", "HE"} if i % 3 else {"MA", "SE"}) for i in range(30)}
    splits = assign_splits(strata, 0.2, seed=1)
    assert sum(s == "val" for s in splits.values()) == 6
    with_se = [i for i in strata if "SE" in strata[i]]
    assert sum(splits[i] == "val" for i in with_se) == 2  # 10 records with SE -> 2 in val
    reordered = dict(reversed(list(strata.items())))
    assert assign_splits(reordered, 0.2, seed=1) == splits
    assert assign_splits(strata, 0.2, seed=2) != splits


@pytest.mark.idrid
def test_real_idrid_counts(idrid_dir: Path, tmp_path: Path) -> None:
    """The acceptance check of the foundation issue, on ../shared/data/idrid."""
    result = ingest(idrid_dir, tmp_path / "out", IngestSettings(working_width=512))
    assert result.summary["records"] == 54
    assert result.summary["masks"] == {"MA": 54, "HE": 53, "EX": 54, "SE": 26, "OD": 54}
    assert result.quarantined == []
    assert result.summary["val"] == 11


def _mask(source: Path, cls: str, record_id: str) -> np.ndarray:
    return dataset.read_mask(source / "masks" / cls / f"{record_id}.png")


def _save_as_jpeg(mask_path: Path) -> None:
    """The lossy export a labelling tool may offer: the .png mask becomes a .jpg."""
    cv2.imwrite(str(mask_path.with_suffix(".jpg")), cv2.imread(str(mask_path)))
    mask_path.unlink()


def _move(source: Path, old: str, new: str) -> None:
    (source / new).parent.mkdir(parents=True, exist_ok=True)
    (source / old).rename(source / new)


@pytest.mark.parametrize(
    ("damage", "bad_file"),
    [
        (
            lambda s: _save_as_jpeg(s / "masks/HE/synth_0002.png"),
            "masks/HE/synth_0002.jpg",
        ),
        (
            lambda s: _move(s, "masks/HE/synth_0002.png", "masks/Haemorrhages/synth_0002.png"),
            "masks/Haemorrhages/synth_0002.png",
        ),
        (
            lambda s: _move(s, "masks/MA/synth_0002.png", "masks/MA/Synth_0002.png"),
            "masks/MA/Synth_0002.png",
        ),
    ],
    ids=["jpg-mask", "unknown-class-folder", "case-mismatch"],
)
def test_photograph_whose_mask_was_rejected_does_not_train_as_lesion_free(
    source: Path, tmp_path: Path, damage: object, bad_file: str
) -> None:
    damage(source)  # type: ignore[operator]
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert "synth_0002" not in _ids(tmp_path / "out")
    assert len(_ids(tmp_path / "out")) == 5
    lines = {Path(p.path).relative_to(source).as_posix(): p for p in result.quarantined}
    assert lines[bad_file].id == "synth_0002" and lines[bad_file].fix
    assert lines["images/synth_0002.png"].problem == MASK_REJECTED
    assert result.summary["quarantined"] == 1
    assert result.summary["quarantined_with_masks"] == 1
    assert "1 photographs, 1 of them for a rejected mask" in format_summary(result.summary)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("IDRiD_03_EX.tif", "IDRiD_03-EX.tif"),
        ("IDRiD_03_EX.tif", "idrid_03_ex.tif"),
        ("IDRiD_03_EX.tif", "IDRiD_3_EX.tif"),
    ],
    ids=["malformed-name", "case-mismatch", "digits"],
)
def test_idrid_photograph_whose_mask_name_is_broken_is_quarantined(
    synthetic_idrid: Path, tmp_path: Path, old: str, new: str
) -> None:
    source = Path(shutil.copytree(synthetic_idrid, tmp_path / "source"))
    folder = next(source.rglob("3. Hard Exudates"))
    (folder / old).rename(folder / new)
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert _ids(tmp_path / "out") == ["IDRiD_01", "IDRiD_02", "IDRiD_04"]
    lost = {Path(p.path).name: p.id for p in result.quarantined}
    assert lost == {new: "IDRiD_03", "IDRiD_03.jpg": "IDRiD_03"}
    assert result.summary["quarantined_with_masks"] == 1


def test_misnamed_mask_folder_fails_ingest_naming_where_it_looked(
    source: Path, tmp_path: Path
) -> None:
    """labels/ instead of masks/: six photographs that are not lesion-free would train as
    if they were (and a model that predicts nothing would pass the gate)."""
    (source / "masks").rename(source / "labels")
    with pytest.raises(IngestError) as raised:
        ingest(source, tmp_path / "out", SETTINGS)
    message = str(raised.value)
    assert "no lesion mask found" in message
    assert "layout generic, detected" in message
    assert "masks/MA/<id>.png, masks/HE/<id>.png, masks/EX/<id>.png, masks/SE/<id>.png" in message
    assert "images/, labels/" in message
    assert not (tmp_path / "out").exists()


def test_class_without_any_mask_is_stated_in_the_summary(source: Path, tmp_path: Path) -> None:
    shutil.rmtree(source / "masks" / "SE")
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert result.summary["classes_without_masks"] == ["SE"]
    assert "no mask at all  SE" in format_summary(result.summary)


def test_skipped_files_are_named_in_the_summary(source: Path, tmp_path: Path) -> None:
    (source / "README.txt").write_text("notes")
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert result.summary["skipped"] == [
        {"path": str(source / "README.txt"), "reason": "not under images/ or masks/<CLASS>/"}
    ]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda m: ~m, "HE mask covers"),
        (lambda m: np.ones_like(m), "HE mask covers"),
        (lambda m: np.roll(m, 120, axis=1) | _corner(m), "of the HE mask lies outside"),
    ],
    ids=["inverted", "all-foreground", "outside-fov"],
)
def test_implausible_mask_is_quarantined_with_its_photograph(
    source: Path, tmp_path: Path, make: object, problem: str
) -> None:
    path = source / "masks/HE/synth_0001.png"
    dataset.write_mask(path, make(dataset.read_mask(path)))  # type: ignore[operator]
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert "synth_0001" not in _ids(tmp_path / "out")
    lines = {Path(p.path).relative_to(source).as_posix(): p for p in result.quarantined}
    assert sorted(lines) == ["images/synth_0001.png", "masks/HE/synth_0001.png"]
    assert problem in lines["masks/HE/synth_0001.png"].problem
    assert lines["images/synth_0001.png"].problem == MASK_REJECTED


def _corner(mask: np.ndarray) -> np.ndarray:
    corner = np.zeros_like(mask)
    corner[:40, :60] = True
    return corner


def test_opaque_lesion_on_transparent_white_is_read_from_alpha(
    source: Path, tmp_path: Path
) -> None:
    mask = _mask(source, "HE", "synth_0000")
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[mask] = (200, 0, 0, 255)  # brightest channel 200 next to 255: colour draws nothing
    rgba[mask, 0] = 255
    (source / "masks/HE/synth_0000.png").unlink()
    Image.fromarray(rgba, "RGBA").save(source / "masks/HE/synth_0000.png")
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert result.quarantined == []
    record = next(r for r in result.manifest.records if r.id == "synth_0000")
    assert record.masks["HE"].pixels == resize_mask(mask, record.size).sum() > 0


def test_mask_whose_colour_and_alpha_disagree_is_refused(source: Path, tmp_path: Path) -> None:
    mask = _mask(source, "HE", "synth_0000")
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (255, 0, 0, 255)
    rgba[..., 3] = np.where(np.roll(mask, 9, axis=0), 255, 0)
    (source / "masks/HE/synth_0000.png").unlink()
    Image.fromarray(rgba, "RGBA").save(source / "masks/HE/synth_0000.png")
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert "synth_0000" not in _ids(tmp_path / "out")
    (line,) = [p for p in result.quarantined if p.path.endswith("HE/synth_0000.png")]
    assert line.problem.startswith("colour and alpha of the mask draw different shapes")


def _not_fundus(name: str, photograph: Path) -> np.ndarray:
    """A uniform grey card, a retina-coloured rectangle on black, or a thumbnail."""
    if name == "thumbnail":
        return cv2.resize(dataset.read_rgb(photograph), (32, 21), interpolation=cv2.INTER_AREA)
    rgb = np.zeros((170, 256, 3), np.uint8)
    if name == "grey-card":
        rgb[:] = 128
    else:
        rgb[30:140, 40:216] = (167, 81, 23)
    return rgb


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("grey-card", "no dark border around the field of view"),
        ("rectangle", "the field of view is not a plausible fundus disc"),
        ("thumbnail", "photograph is 32x21: under 256 px wide"),
    ],
)
def test_photograph_that_is_not_a_fundus_photograph_is_quarantined(
    source: Path, tmp_path: Path, name: str, problem: str
) -> None:
    photograph = _not_fundus(name, source / "images/synth_0000.png")
    cv2.imwrite(str(source / "images" / f"{name}.png"), photograph[..., ::-1])
    result = ingest(source, tmp_path / "out", SETTINGS)
    assert len(_ids(tmp_path / "out")) == 6
    (line,) = result.quarantined
    assert Path(line.path).name == f"{name}.png"
    assert line.problem.startswith(problem), line.problem
