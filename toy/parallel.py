"""Independent jobs on the machine's cores: the methods' fine-tunings do not depend on each other.

Every method starts from the same frozen reference and draws from its own generator (seeded by the seed and the
method's name, toy/run.py), so it gives the same numbers in any process and in any order: ``run_jobs`` may hand
them to worker processes. On Linux with one torch thread the workers are forked (they inherit the reference and
the data, and start at once); elsewhere, or with several torch threads (an OpenMP pool does not survive a fork),
they are spawned and import torch first.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Callable, Iterable, Iterator

import torch

_shared = None  # what every job reads, set once per worker process by ``_start_worker``


def default_workers() -> int:
    """Two workers where there are two cores: the toy's jobs are single-threaded (one torch thread is fastest)."""
    return max(1, min(2, os.cpu_count() or 1))


def _start_worker(shared, threads: int) -> None:
    global _shared
    _shared = shared
    torch.set_num_threads(threads)


def _call(job_and_item):
    job, item = job_and_item
    return job(_shared, item)


def run_jobs(job: Callable, shared, items: Iterable, workers: int, while_waiting: Callable | None = None) -> Iterator:
    """``job(shared, item)`` for every item, in ``workers`` processes (in this one if ``workers == 1``).

    Yields the results as they finish (not in ``items`` order); ``job`` must be a module-level function.
    ``while_waiting()`` runs in this process once the workers have started (before the first job without them).
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        if while_waiting is not None:
            while_waiting()
        for item in items:
            yield job(shared, item)
        return
    threads = torch.get_num_threads()
    method = "fork" if sys.platform.startswith("linux") and threads == 1 else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(min(workers, len(items)), initializer=_start_worker, initargs=(shared, threads)) as pool:
        results = pool.imap_unordered(_call, [(job, item) for item in items], chunksize=1)
        if while_waiting is not None:  # the workers are forked already: this process's work is not copied
            while_waiting()
        yield from results
