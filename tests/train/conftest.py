"""Fixtures the training tests share."""

from pathlib import Path

import pytest

from drseg.config import ClaheSettings, IngestSettings
from drseg.data.enhance import clahe_dataset
from drseg.data.ingest import ingest


@pytest.fixture(scope="session")
def clahe_256(synthetic_generic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six synthetic photographs at 256 px wide, ingested and CLAHE'd as the pipeline
    does: fine-tuning's training data and pretraining's labelled input."""
    root = tmp_path_factory.mktemp("clahe_256")
    ingest(synthetic_generic, root / "ingested", IngestSettings(working_width=256, workers=1))
    clahe_dataset(root / "ingested", root / "clahe", ClaheSettings(workers=1))
    return root / "clahe"
