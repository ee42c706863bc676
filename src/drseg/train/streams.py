"""Random generators for endless training streams, keyed by where each item lands.

A stream item's generator is seeded by (seed..., batch index, position in the batch). The
DataLoader workers of an IterableDataset make batches in turn (worker w makes batches w,
w + W, w + 2W, ...), so each worker draws exactly the items of its own batches. Hence:
- the stream is the same for any number of workers;
- a run resumed at step k draws what an uninterrupted run draws from step k on, so resuming
  is exact (tests/train/test_finetune.py compares the weights);
- processes of a distributed run put their rank in `seed` and get disjoint streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import get_worker_info


def item_generators(
    seed: Sequence[int], first_batch: int, batch_size: int
) -> Iterator[np.random.Generator]:
    """One generator per item of this worker's batches, from batch `first_batch` on."""
    worker = get_worker_info()
    offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    batch = first_batch + offset
    while True:
        for item in range(batch_size):
            yield np.random.default_rng([*seed, batch, item])
        batch += stride
