"""Ordered parallel map over a process pool, with a progress bar.

Image stages are CPU-bound per record, so processes (not threads) and one OpenCV thread
per process: N processes x N OpenCV threads would oversubscribe the cores. Workers start
from a fork server, never by forking the caller: a fork of a process whose OpenCV thread
pool has run deadlocks in the child.

Workers end with the process that started them, however it ends (kill -9 included): a
worker blocked on its task queue or busy with a record would otherwise live on, writing
into an output folder nobody will use.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import cv2
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def _exit_with_parent() -> None:
    """Wait for the parent's end (its sentinel pipe closes when it dies), then exit at once."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent.join()
    os._exit(1)


def _start_worker() -> None:
    cv2.setNumThreads(1)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def parallel_map(
    fn: Callable[[T], R], items: list[T], workers: int | None, desc: str
) -> Iterator[R]:
    """Ordered map over a process pool with a progress bar; one process runs inline."""
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr, disable=None)
    try:
        if workers == 1 or len(items) <= 1:
            results: Iterable[R] = map(fn, items)
            for result in results:
                bar.update()
                yield result
            return
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
            for result in pool.map(fn, items, chunksize=1):
                bar.update()
                yield result
    finally:
        bar.close()
