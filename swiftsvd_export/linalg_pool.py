"""Run a block's independent decompositions side by side on the CPU, each with few BLAS threads.

LAPACK's symmetric eigensolver and SVD spend most of their time reducing the matrix to
tridiagonal (bidiagonal) form, half of it matrix-vector products that are bound by memory
latency and use about one core whatever the thread count: an fp64 eigh of a 576 × 576 output
covariance takes 25 ms with 2 threads and 28 ms with 1 on the 2-core CI machine. So T
decompositions at once with one thread each finish sooner than the same T one after another with
T threads each (SmolLM2, swift fp32: 178 against 270 ms a block). Each worker's thread count is
fixed, so the results do not depend on the order in which the tasks run. On a GPU the tasks run
in order in the calling thread: the device serializes them anyway.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's worker threads (nor its lock holders): it starts
    its own pools."""
    global _lock
    _lock = threading.Lock()
    _pools.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool(workers: int, threads_each: int) -> ThreadPoolExecutor:
    """One executor per (workers, threads each), kept for the process: its threads are idle
    between blocks, and torch's per-thread settings are made once, in the initializer."""
    with _lock:
        key = (workers, threads_each)
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="swiftsvd-linalg",
                                             initializer=torch.set_num_threads, initargs=(threads_each,))
        return _pools[key]


def workers(tasks: int, device: torch.device | str = "cpu") -> int:
    """How many of ``tasks`` :func:`run_each` runs at once (what a memory estimate must allow for)."""
    return max(1, min(tasks, torch.get_num_threads())) if torch.device(device).type == "cpu" else 1


def run_each(tasks: Sequence[Callable[[], T]], device: torch.device | str = "cpu",
             sizes: Sequence[float] | None = None) -> list[T]:
    """The results of ``tasks``, in their order. On the CPU, with more than one thread and task,
    min(tasks, threads) workers share the calling thread's torch thread count and take the tasks
    largest ``sizes`` first (so that a big one does not start last)."""
    n = workers(len(tasks), device)
    if n <= 1:
        return [task() for task in tasks]
    order = sorted(range(len(tasks)), key=lambda i: -sizes[i]) if sizes is not None else range(len(tasks))
    grad = torch.is_grad_enabled()  # thread-local: the workers take the caller's
    futures = {i: _pool(n, torch.get_num_threads() // n).submit(_call, tasks[i], grad) for i in order}
    return [futures[i].result() for i in range(len(tasks))]


def _call(task: Callable[[], T], grad: bool) -> T:
    with torch.set_grad_enabled(grad):
        return task()
