"""Parallel execution for the mask arithmetic of :mod:`secure_fl.crypto.prg`.

Tasks (groups of masks, or slabs of a vector made of whole chunks) run on one process-wide
thread pool. This is worth it because pyca/cryptography's ``update_into`` and NumPy's ufunc
loops release the GIL. The pool
is re-created after a fork (a pool inherited by fork has no threads) and never used re-entrantly
(a call from one of its own workers runs inline, so nested calls cannot deadlock).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from itertools import pairwise

from secure_fl.errors import ConfigError

__all__ = ["PARALLEL_MIN_BYTES", "THREADS_ENV", "mask_threads", "plan_slabs", "run_parallel"]

THREADS_ENV = "SECURE_FL_THREADS"
"""Environment variable capping the threads of mask generation (the same knob as torch's, see
``secure_fl.training.threads``); ``1`` makes every computation single-threaded."""

_MAX_THREADS = 8
PARALLEL_MIN_BYTES = 1 << 20
"""Vectors smaller than this stay on the calling thread (handing work to a pool costs tens of
microseconds)."""
# Slabs per thread: more slabs than threads evens out a core that another process slows down.
_SLABS_PER_THREAD = 4


def mask_threads() -> int:
    """The number of threads mask generation uses: ``SECURE_FL_THREADS`` when set, otherwise the
    CPUs this process may run on (its affinity set), at most 8.

    Errors: ConfigError when ``SECURE_FL_THREADS`` is set but not an integer >= 1.
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            parsed = int(env)
        except ValueError:
            parsed = 0
        if parsed < 1:
            raise ConfigError(f"{THREADS_ENV} must be an integer >= 1, got {env!r}")
        return min(parsed, _MAX_THREADS)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_THREADS))


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_size = 0
_pool_lock = threading.Lock()
_local = threading.local()


def _mark_worker() -> None:
    _local.worker = True


def _executor(threads: int) -> ThreadPoolExecutor:
    """The process-wide worker pool, (re)created after a fork or when more threads are needed."""
    global _pool, _pool_pid, _pool_size
    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool_pid != pid or _pool_size < threads:
            old = _pool if _pool_pid == pid else None  # a pool inherited by fork has no threads
            _pool = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="secure_fl-mask", initializer=_mark_worker
            )
            _pool_pid, _pool_size = pid, threads
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def run_parallel(tasks: Sequence[Callable[[], None]], threads: int) -> None:
    """Run every task, on up to ``threads`` pool threads, and return when all are done; the first
    exception raised by a task is re-raised here (after all tasks ended). One task, one thread,
    or a call from a pool worker runs the tasks inline in the calling thread, in order."""
    if len(tasks) <= 1 or threads <= 1 or getattr(_local, "worker", False):
        for task in tasks:
            task()
        return
    pool = _executor(min(len(tasks), threads))
    futures: list[Future[None]] = [pool.submit(task) for task in tasks]
    wait(futures)
    for future in futures:
        future.result()


def plan_slabs(length: int, itemsize: int, chunk_words: int, threads: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` into slabs of whole chunks (so every slab starts on a 16-byte
    boundary): one slab when single-threaded or small (under 1 MiB), else up to 4 per thread.
    The slabs are in order, disjoint and cover ``[0, length)``."""
    chunks = -(-length // chunk_words)
    if threads <= 1 or length * itemsize < PARALLEL_MIN_BYTES or chunks < 2:
        return [(0, length)]
    count = min(chunks, threads * _SLABS_PER_THREAD)
    bounds = [min(length, (chunks * i // count) * chunk_words) for i in range(count + 1)]
    return [(lo, hi) for lo, hi in pairwise(bounds) if hi > lo]
