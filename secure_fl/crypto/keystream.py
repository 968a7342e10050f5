"""The AES-256-CTR keystream of :mod:`secure_fl.crypto.prg`, computed fast, and its chunked sums.

Definition (the only one): the keystream under key ``k`` is ``E_k(0), E_k(1), E_k(2), ...`` where
block ``i`` is encrypted as the 128-bit big-endian integer ``i`` (AES-256-CTR with initial
counter block ``0^128``, the whole block incremented).

How it is computed: for blocks 2 and up it is the ciphertext of zeros under AES-256-GCM with the
96-bit IV ``0^96``: GCM encrypts plaintext block ``j`` with ``E_k(inc32^(j+1)(J0))``, and for a
96-bit IV ``J0 = IV || 0^31 || 1``, so block ``j`` is XORed with ``E_k(0^96 || [j + 2]_32)``,
which is ``E_k(j + 2)`` as long as the 32-bit counter does not wrap (masks under 64 GiB; longer
ones fall back to CTR). Blocks 0 and 1 (32 bytes) come from AES-CTR. The GCM tag is never
computed or used. Why: OpenSSL runs GCM with VAES/AVX-512 where it has them and CTR without
(measured on a 2-core AMD EPYC: 21 GB/s against 8.4 GB/s per core), and both are the same
keystream. The equality is tested against CTR and against the NIST SP 800-38A vectors
(tests/crypto/test_crypto_prg.py).

A GCM stream cannot start in the middle, so parallel work is split by seeds: each thread owns
a group of masks, sums its group's keystreams chunk by chunk in a cache-sized buffer and adds
that partial sum into the target chunk under the chunk's lock. Modular addition is commutative
and associative, so the result is bit for bit the same whatever the threads and chunks.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secure_fl.crypto.parallel import run_parallel

__all__ = ["KeyStream", "add_terms", "discard", "fill"]

_BLOCK = 16
_HEAD = 2 * _BLOCK  # GCM with a 96-bit IV starts at counter block 2
_GCM_MAX = (2**32 - 2) * _BLOCK  # bytes of GCM output before its 32-bit counter wraps
_BIG_ENDIAN = sys.byteorder == "big"

Array = np.ndarray[Any, np.dtype[np.unsignedinteger[Any]]]

# One shared, read-only all-zero input buffer (the keystream is the encryption of zeros), grown
# to the largest chunk requested; ``bytes(n)`` is calloc-backed, untouched pages cost nothing.
_zeros: bytes = b""
_zeros_lock = threading.Lock()


def zero_input(nbytes: int) -> memoryview:
    """A read-only view of ``nbytes`` zero bytes (shared)."""
    global _zeros
    buf = _zeros
    if len(buf) < nbytes:
        with _zeros_lock:
            if len(_zeros) < nbytes:
                _zeros = bytes(nbytes)
            buf = _zeros
    return memoryview(buf)[:nbytes]


def ctr_encryptor(key: bytes, counter_block: bytes) -> Any:
    """An AES-256-CTR encryptor (pyca/cryptography) starting at ``counter_block``."""
    return Cipher(algorithms.AES(key), modes.CTR(counter_block)).encryptor()


class KeyStream:
    """The keystream of one key for a mask of ``total`` bytes, read in order: :meth:`first`
    once for the first chunk (at least 32 bytes, or the whole mask), then ``update(zeros, out)``
    for each following chunk (``zeros`` a zero view of ``out``'s length). One stream belongs to
    one thread."""

    __slots__ = ("_head", "update")

    def __init__(self, key: bytes, total: int) -> None:
        if _HEAD < total <= _HEAD + _GCM_MAX:
            self._head = ctr_encryptor(key, bytes(_BLOCK)).update(bytes(_HEAD))
            enc = Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()
        else:
            self._head = b""
            enc = ctr_encryptor(key, bytes(_BLOCK))
        #: ``update(zeros, out)`` writes the next ``len(out)`` keystream bytes into ``out``.
        self.update: Callable[[memoryview, memoryview], int] = enc.update_into

    def first(self, out: memoryview) -> None:
        """Write the first ``len(out)`` keystream bytes into ``out`` (a writable byte view)."""
        n = out.nbytes
        head = min(n, len(self._head))
        out[:head] = self._head[:head]
        if head < n:
            self.update(zero_input(n - head), out[head:])


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, length)) for a in range(0, length, chunk)]


def _groups(terms: Sequence[tuple[bytes, int]], threads: int) -> list[list[tuple[bytes, int]]]:
    count = max(1, min(threads, len(terms)))
    return [list(terms[i::count]) for i in range(count)]


def fill(out: Array, key: bytes, chunk: int) -> None:
    """``out`` (C-contiguous) := the keystream of ``key`` as little-endian words."""
    raw = out.data.cast("B")
    size = out.dtype.itemsize
    stream = KeyStream(key, out.nbytes)
    for index, (a, b) in enumerate(_chunks(out.shape[0], chunk)):
        view = raw[a * size : b * size]
        if index == 0:
            stream.first(view)
        else:
            stream.update(zero_input(view.nbytes), view)
        if _BIG_ENDIAN:  # pragma: no cover - keystream words are little-endian
            out[a:b].byteswap(inplace=True)


def add_terms(
    acc: Array,
    terms: Sequence[tuple[bytes, int]],
    base: Array | None,
    chunk: int,
    threads: int,
) -> None:
    """``acc := (base or acc) + sum(sign * keystream(key))`` modulo the word size, chunk by
    chunk, on up to ``threads`` threads (each owning a group of terms). ``base`` must not
    overlap ``acc``; the caller checked shapes, dtypes, keys and signs."""
    length, dtype, size = acc.shape[0], acc.dtype, acc.dtype.itemsize
    chunk = min(chunk, length)
    chunks = _chunks(length, chunk)
    if not terms:
        if base is not None:
            acc[...] = base
        return
    groups = _groups(terms, threads)
    locks = [threading.Lock() for _ in chunks] if len(groups) > 1 else []
    started = [base is None] * len(chunks)

    def work(group: list[tuple[bytes, int]]) -> None:
        local = np.empty(chunk, dtype=dtype)
        scratch = np.empty(chunk, dtype=dtype)
        local_raw, scratch_raw = local.data.cast("B"), scratch.data.cast("B")
        zeros_full = zero_input(chunk * size)
        streams = [KeyStream(key, length * size) for key, _ in group]
        lead = group[0][1]  # local holds lead * (the group's signed sum)
        rest = [
            (stream, np.add if sign == lead else np.subtract)
            for stream, (_, sign) in zip(streams[1:], group[1:], strict=True)
        ]
        merge = np.add if lead == 1 else np.subtract
        for index, (a, b) in enumerate(chunks):
            n = b - a
            if n == chunk:
                part, ks, part_raw, ks_raw, zeros = (
                    local,
                    scratch,
                    local_raw,
                    scratch_raw,
                    zeros_full,
                )
            else:
                part, ks = local[:n], scratch[:n]
                part_raw, ks_raw = local_raw[: n * size], scratch_raw[: n * size]
                zeros = zero_input(n * size)
            if index == 0:  # the first chunk holds each stream's CTR head
                streams[0].first(part_raw)
                if _BIG_ENDIAN:  # pragma: no cover - keystream words are little-endian
                    part.byteswap(inplace=True)
                for stream, op in rest:
                    stream.first(ks_raw)
                    if _BIG_ENDIAN:  # pragma: no cover
                        ks.byteswap(inplace=True)
                    op(part, ks, out=part)
            else:
                streams[0].update(zeros, part_raw)
                if _BIG_ENDIAN:  # pragma: no cover - keystream words are little-endian
                    part.byteswap(inplace=True)
                for stream, op in rest:
                    stream.update(zeros, ks_raw)
                    if _BIG_ENDIAN:  # pragma: no cover
                        ks.byteswap(inplace=True)
                    op(part, ks, out=part)
            dst = acc[a:b]
            if locks:
                with locks[index]:
                    _merge(merge, dst, part, base, a, b, started, index)
            else:
                _merge(merge, dst, part, base, a, b, started, index)

    run_parallel([partial(work, group) for group in groups], len(groups))


def _merge(
    op: Callable[..., Any],
    dst: Array,
    part: Array,
    base: Array | None,
    a: int,
    b: int,
    started: list[bool],
    index: int,
) -> None:
    if started[index] or base is None:
        op(dst, part, out=dst)
    else:
        op(base[a:b], part, out=dst)
        started[index] = True


def discard(keys: Sequence[bytes], length: int, itemsize: int, chunk: int, threads: int) -> None:
    """Generate the keystream of every key with the chunks and thread groups of
    :func:`add_terms` into scratch buffers, and discard it (its cost floor)."""
    chunk = min(chunk, length)
    chunks = _chunks(length, chunk)
    groups = _groups([(key, 1) for key in keys], threads)

    def work(group: list[tuple[bytes, int]]) -> None:
        raw = np.empty(chunk * itemsize, dtype=np.uint8).data.cast("B")
        zeros_full = zero_input(chunk * itemsize)
        streams = [KeyStream(key, length * itemsize) for key, _ in group]
        for index, (a, b) in enumerate(chunks):
            nbytes = (b - a) * itemsize
            view = raw if nbytes == len(raw) else raw[:nbytes]
            zeros = zeros_full if nbytes == len(raw) else zero_input(nbytes)
            for stream in streams:
                if index == 0:
                    stream.first(view)
                else:
                    stream.update(zeros, view)

    run_parallel([partial(work, group) for group in groups], len(groups))
