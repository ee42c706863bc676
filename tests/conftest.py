"""Shared fixtures: small synthetic datasets (generated, never copied from IDRiD)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drseg.data.synthetic import write_synthetic_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: each computes on one thread (set
    # before torch loads, and inherited by the subprocesses it starts). Otherwise every
    # worker and subprocess would start a thread per core: many more threads than cores.
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
IDRID = Path(os.environ.get("DRSEG_IDRID_DIR", REPO.parent / "shared" / "data" / "idrid"))

SLOWEST_FIRST = (
    "pipelines/test_training_local.py",  # ~240 s on one core: three kfp.local pipeline runs
    "train/test_finetune.py",  # ~130 s: the killed-and-resumed and the uninterrupted run
    "bench/test_gpu_suite.py",  # ~80 s
    "deploy/test_analysis_templates.py",
    "data/test_ingest.py",
    "train/test_pretrain.py",
    "pipelines/test_compiled.py",
    "integration/test_training_checkpoints.py",
)
"""Test files that take a minute or more (`make test` durations, 2 cores), longest first.
pytest-xdist hands whole files to its workers in collection order (`make test` passes
--dist loadfile --no-loadscope-reorder): a long file handed out last would run alone at
the end while the other core idles."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(TESTS).as_posix() if item.path.is_relative_to(TESTS) else ""
        return SLOWEST_FIRST.index(path) if path in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept


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
