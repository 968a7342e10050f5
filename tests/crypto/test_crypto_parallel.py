"""Tests for secure_fl.crypto.parallel: thread count, slab plans, the pool across fork and nesting."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from functools import partial
from typing import Any

import numpy as np
import pytest

from secure_fl.crypto import parallel
from secure_fl.crypto.parallel import THREADS_ENV, mask_threads, plan_slabs, run_parallel
from secure_fl.crypto.prg import MaskPRG
from secure_fl.errors import ConfigError


def test_mask_threads_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "1")
    assert mask_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert mask_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "1000")
    assert mask_threads() == 8  # capped
    monkeypatch.delenv(THREADS_ENV)
    assert 1 <= mask_threads() <= 8


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_mask_threads_rejects_bad_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ConfigError, match=THREADS_ENV):
        mask_threads()


def test_single_thread_setting_runs_in_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "1")
    seen: set[str] = set()
    assert plan_slabs(1 << 20, 4, 1 << 14, mask_threads()) == [(0, 1 << 20)]
    tasks = [lambda: seen.add(threading.current_thread().name) for _ in range(4)]
    run_parallel(tasks, mask_threads())
    assert seen == {threading.current_thread().name}
    # MaskPRG with the default thread count then stays on this thread as well.
    names: list[str] = []
    original = parallel._executor

    def spy(threads: int) -> Any:
        names.append("pool")
        return original(threads)

    monkeypatch.setattr(parallel, "_executor", spy)
    prg = MaskPRG(1 << 20, 32)
    prg.add_many_into(np.zeros(1 << 20, dtype=np.uint32), [(bytes(32), 1), (b"\x01" * 32, -1)])
    assert names == []
    monkeypatch.setenv(THREADS_ENV, "2")
    prg.add_many_into(np.zeros(1 << 20, dtype=np.uint32), [(bytes(32), 1), (b"\x01" * 32, -1)])
    assert names == ["pool"]


def test_run_parallel_uses_the_pool_threads() -> None:
    seen: set[str] = set()
    barrier = threading.Barrier(2, timeout=30)

    def task() -> None:
        seen.add(threading.current_thread().name)
        barrier.wait()  # both tasks run at the same time, on two pool threads

    run_parallel([task, task], 2)
    assert len(seen) == 2 and all(name.startswith("secure_fl-mask") for name in seen)


@pytest.mark.parametrize(
    ("length", "itemsize", "chunk", "threads"),
    [(10, 4, 4, 2), (300_001, 4, 1024, 2), (1 << 20, 8, 1 << 15, 3), (262_144, 4, 65_536, 8)],
)
def test_plan_slabs_cover_in_order_on_chunk_boundaries(
    length: int, itemsize: int, chunk: int, threads: int
) -> None:
    slabs = plan_slabs(length, itemsize, chunk, threads)
    assert slabs[0][0] == 0 and slabs[-1][1] == length
    for (_, hi), (lo, _) in itertools.pairwise(slabs):
        assert hi == lo and lo % chunk == 0
    assert all(hi > lo for lo, hi in slabs)
    if length * itemsize >= 1 << 20:
        assert len(slabs) > 1  # large vectors are split across the threads


def test_run_parallel_reraises_a_task_error() -> None:
    def work(n: int) -> None:
        if n > 0:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_parallel([partial(work, n) for n in range(3)], 2)


def test_nested_call_from_a_worker_runs_inline() -> None:
    """A worker that itself calls run_parallel must not wait on the (busy) pool: no deadlock."""
    done: list[int] = []

    def outer(lo: int) -> None:
        run_parallel([partial(done.append, lo), partial(done.append, lo + 1)], 2)

    run_parallel([partial(outer, lo) for lo in (0, 10, 20, 30)], 2)
    assert sorted(done) == [0, 1, 10, 11, 20, 21, 30, 31]


def _child(queue: multiprocessing.Queue[bytes]) -> None:
    length = 300_001
    acc = np.zeros(length, dtype=np.uint32)
    MaskPRG(length, 32, threads=2, chunk_bytes=4096).add_many_into(acc, [(bytes(32), 1)])
    queue.put(acc.tobytes()[:64])


def test_pool_is_recreated_in_a_forked_child() -> None:
    """A pool inherited through fork has no threads; the child must build its own, not hang."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    length = 300_001
    acc = np.zeros(length, dtype=np.uint32)
    MaskPRG(length, 32, threads=2, chunk_bytes=4096).add_many_into(acc, [(bytes(32), 1)])
    assert parallel._pool is not None  # the parent's pool exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bytes] = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    try:
        assert queue.get(timeout=60) == acc.tobytes()[:64]
    finally:
        proc.join(60)
        if proc.is_alive():  # pragma: no cover - only on a hang
            proc.kill()
    assert proc.exitcode == 0
