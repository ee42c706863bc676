"""Shared fixtures: small synthetic datasets (generated, never copied from IDRiD)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drseg.data.synthetic import write_synthetic_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: each computes on one thread (set
    # before torch loads, and inherited by the subprocesses it starts), or two workers of a
    # thread per core each would oversubscribe the cores many times over.
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
IDRID = Path(os.environ.get("DRSEG_IDRID_DIR", REPO.parent / "shared" / "data" / "idrid"))


@pytest.fixture(scope="session")
def synthetic_generic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 256-px photographs in the generic layout. Read-only: copy before changing."""
    out = tmp_path_factory.mktemp("synthetic") / "generic"
    write_synthetic_dataset(out, n=6, seed=7, width=256, layout="generic")
    return out


@pytest.fixture(scope="session")
def synthetic_idrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 256-px photographs in IDRiD's own folder layout."""
    out = tmp_path_factory.mktemp("synthetic") / "idrid"
    write_synthetic_dataset(out, n=4, seed=3, width=256, layout="idrid")
    return out


@pytest.fixture(scope="session")
def idrid_dir() -> Path:
    if not (IDRID / "A. Segmentation").is_dir():
        pytest.skip(f"IDRiD not found at {IDRID} (set DRSEG_IDRID_DIR to its folder)")
    return IDRID
