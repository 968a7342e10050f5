"""Encryption on several cores: worker processes that each hold the site's secret context.

TenSEAL encrypts one ciphertext at a time and holds the GIL throughout, and its context's thread
pool serves tensor operations, not vector encryption; so threads do not help. An
:class:`EncryptionPool` starts ``workers`` processes ("spawn": safe alongside torch and other
threaded libraries), hands each the secret artefact once through its initializer (deliberately,
over the local pipe to a child process of the same user; it is never written anywhere), and
encrypts chunks there. Frames come back in submission order.

Start-up costs about 0.3 s per pool; a pool lives as long as its owner and is reused across
rounds. Close it with :meth:`EncryptionPool.close` (or a ``with`` block); it is also shut down
when garbage-collected.
"""

from __future__ import annotations

import multiprocessing
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError, CryptoError
from secure_fl.he.context import SecretContext
from secure_fl.he.packing import Layout

_STATE: dict[str, Any] = {}


def _init_worker(secret_artefact: bytes) -> None:
    from secure_fl.he.aggregate import SiteEncryptor  # noqa: F401  (warm the import)

    _STATE["secret"] = SecretContext.from_bytes(secret_artefact)
    _STATE["encryptors"] = {}


def _encrypt_task(
    layout: tuple[int, int, int],
    values: npt.NDArray[np.float64],
    chunk: int,
    factor: float,
    round_id: int,
) -> tuple[bytes, float]:
    from secure_fl.he.aggregate import SiteEncryptor

    start = time.perf_counter()
    encryptors: dict[tuple[int, int, int], SiteEncryptor] = _STATE["encryptors"]
    encryptor = encryptors.get(layout)
    if encryptor is None:
        encryptor = SiteEncryptor(_STATE["secret"], Layout(*layout))
        encryptors[layout] = encryptor
    frame = encryptor.encrypt_chunk(values, chunk=chunk, factor=factor, round_id=round_id)
    return frame, time.perf_counter() - start


def _shutdown(executor: ProcessPoolExecutor) -> None:
    executor.shutdown(wait=True, cancel_futures=True)


class EncryptionPool:
    """``workers`` processes encrypting chunks under one secret context.

    Errors: ConfigError for ``workers`` not an integer >= 1 or ``secret`` not a SecretContext;
    CryptoError when a worker process dies; a worker's own errors (InvalidUpdateError,
    CryptoError, ...) are re-raised in the caller.
    """

    def __init__(self, secret: SecretContext, workers: int) -> None:
        if not isinstance(secret, SecretContext):
            raise ConfigError(
                f"an encryption pool needs a SecretContext, got {type(secret).__name__}"
            )
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers = workers
        self.fingerprint = secret.fingerprint
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(secret.to_bytes(),),
        )
        self._finalizer = weakref.finalize(self, _shutdown, self._executor)

    def __repr__(self) -> str:
        return f"EncryptionPool(workers={self.workers}, fingerprint={self.fingerprint[:16]})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("EncryptionPool holds the CKKS secret key and cannot be pickled")

    def __enter__(self) -> EncryptionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        self._finalizer()

    def submit(
        self,
        layout: Layout,
        values: npt.NDArray[Any],
        *,
        chunk: int,
        factor: float,
        round_id: int,
    ) -> Future[tuple[bytes, float]]:
        """Encrypt one chunk in a worker; the future gives ``(frame, worker seconds)``."""
        if not self._finalizer.alive:
            raise ConfigError("the encryption pool is closed")
        key = (layout.size, layout.slots, layout.chunk_ciphertexts)
        data = np.ascontiguousarray(values, dtype=np.float64)
        return self._executor.submit(_encrypt_task, key, data, chunk, factor, round_id)

    def ordered(
        self,
        tasks: Iterable[tuple[Layout, npt.NDArray[Any], int, float, int]],
        *,
        lookahead: int | None = None,
    ) -> Iterator[tuple[bytes, float]]:
        """Run ``(layout, values, chunk, factor, round_id)`` tasks, yielding results in order.

        At most ``lookahead`` tasks (default ``2 * workers``) are in flight, which bounds memory.
        """
        depth = lookahead if lookahead is not None else 2 * self.workers
        pending: deque[Future[tuple[bytes, float]]] = deque()
        iterator = iter(tasks)
        try:
            for layout, values, chunk, factor, round_id in iterator:
                pending.append(
                    self.submit(layout, values, chunk=chunk, factor=factor, round_id=round_id)
                )
                if len(pending) >= depth:
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())
        finally:
            for future in pending:
                future.cancel()


def _result(future: Future[tuple[bytes, float]]) -> tuple[bytes, float]:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise CryptoError("a CKKS encryption worker process died") from exc
