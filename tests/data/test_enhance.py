from pathlib import Path

import numpy as np
import pytest

from drseg.config import ClaheSettings, IngestSettings
from drseg.data import dataset
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest


@pytest.fixture(scope="module")
def ingested(synthetic_generic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("enhance") / "ingested"
    ingest(synthetic_generic, out, IngestSettings(working_width=192, workers=1))
    return out


def test_clahe_stage_changes_only_the_photographs(ingested: Path, tmp_path: Path) -> None:
    manifest = clahe_dataset(ingested, tmp_path / "out", ClaheSettings(workers=2))
    parent = dataset.load_manifest(ingested)
    assert manifest.parent_hash == parent.dataset_hash != manifest.dataset_hash
    assert manifest.records == parent.records
    assert dataset.load_manifest(tmp_path / "out") == manifest
    for record in manifest.records:
        fov = dataset.read_mask(dataset.fov_path(tmp_path / "out", record.id))
        before = dataset.read_rgb(dataset.image_path(ingested, record.id))
        after = dataset.read_rgb(dataset.image_path(tmp_path / "out", record.id))
        assert not after[~fov].any(), "the border must stay black"
        assert not np.array_equal(before[fov], after[fov])
        for cls in record.masks:
            assert np.array_equal(
                dataset.read_mask(dataset.mask_path(ingested, cls, record.id)),
                dataset.read_mask(dataset.mask_path(tmp_path / "out", cls, record.id)),
            )


def test_clahe_hash_follows_input_and_parameters(ingested: Path, tmp_path: Path) -> None:
    a = clahe_dataset(ingested, tmp_path / "a", ClaheSettings(workers=1)).dataset_hash
    b = clahe_dataset(ingested, tmp_path / "b", ClaheSettings(workers=1)).dataset_hash
    c = clahe_dataset(ingested, tmp_path / "c", ClaheSettings(clip_limit=3.0, workers=1))
    assert a == b != c.dataset_hash
    assert c.params["clahe"] == {"clip_limit": 3.0, "tile_grid": 8}


def test_clahe_refuses_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(dataset.DatasetError, match=r"not a drseg dataset.*drseg ingest"):
        clahe_dataset(tmp_path, tmp_path / "out", ClaheSettings())
    assert not (tmp_path / "out").exists()
