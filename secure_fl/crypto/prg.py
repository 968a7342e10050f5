"""Pseudo-random generator for secure-aggregation masks: AES-256-CTR keystream as integers.

Guarantee: ``expand(seed)`` is the AES-256-CTR keystream under key ``seed`` (32 bytes) with
initial counter block ``0^128`` (the 128-bit block is incremented as a big-endian integer),
read as little-endian ``uint32`` or ``uint64`` words. AES-256 in counter mode is a PRG under the
standard assumption that AES is a pseudo-random permutation: for a uniformly random secret seed
the output is indistinguishable from uniform words in ``[0, 2**bits)`` (up to the PRP/PRF
switching distance, negligible for any mask length used here), so ``x + PRG(seed) mod 2**bits``
hides ``x``. Each seed must be used for ONE mask only; the protocol ensures this because seeds
are derived from fresh per-round keys. The output is fully determined by the seed on every
platform (it is the reference definition both sides of a pairwise mask must agree on), and it
does not depend on the chunk size or the number of threads used to compute it.

Speed: the keystream is written by OpenSSL straight into NumPy memory, with no Python loop over
elements (:mod:`secure_fl.crypto.keystream` computes the same CTR keystream through AES-GCM,
which OpenSSL runs with VAES/AVX-512). :meth:`MaskPRG.add_many_into` generates and adds all the
masks of a party in cache-sized chunks (256 KiB by default), so the target vector crosses main
memory about once per thread instead of twice per mask, and spreads the masks over a small
thread pool (pyca/cryptography and NumPy release the GIL; :func:`mask_threads`). Measured on a
2-core AMD EPYC (AVX-512, VAES), one thread: 0.9 ms of keystream per 4.8 M-word ``uint32``
mask (about 21 GB/s, against 2.3 ms with OpenSSL's AES-CTR); one site's 10 masks generated and
added onto its input in about 12 ms against 8.6 ms for their keystream alone (the adds and one
pass over the vector in memory are the difference); ``benchmarks/secagg_speed.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.crypto import keystream
from secure_fl.crypto.parallel import (
    PARALLEL_MIN_BYTES,
    THREADS_ENV,
    mask_threads,
    plan_slabs,
    run_parallel,
)
from secure_fl.errors import ConfigError, InvalidKeyError

__all__ = [
    "CHUNK_BYTES",
    "SEED_SIZE",
    "THREADS_ENV",
    "MaskArray",
    "MaskPRG",
    "MaskTerm",
    "expand_mask",
    "mask_threads",
    "sum_into",
]

SEED_SIZE = 32
"""Size in bytes of a PRG seed (an AES-256 key)."""

CHUNK_BYTES = 256 * 1024
"""Default chunk size of the generate-and-add loop (fits a core's L2 cache with its scratch)."""

MaskArray = npt.NDArray[np.unsignedinteger[Any]]
"""A 1-D ``uint32`` or ``uint64`` array holding a mask or a masked vector."""

MaskTerm = tuple[bytes, int]
"""One mask of a sum: ``(seed, sign)`` with ``sign`` +1 (add ``PRG(seed)``) or -1 (subtract)."""

_BLOCK_SIZE = 16
_MIN_CHUNK = 64  # the first chunk holds the keystream's CTR head (32 bytes) whole
_DTYPES: dict[int, type[np.unsignedinteger[Any]]] = {32: np.uint32, 64: np.uint64}


def _check_seed(seed: object) -> bytes:
    if not isinstance(seed, bytes | bytearray | memoryview):
        raise InvalidKeyError(f"seed must be bytes, got {type(seed).__name__}")
    data = bytes(seed)
    if len(data) != SEED_SIZE:
        raise InvalidKeyError(f"seed must be {SEED_SIZE} bytes, got {len(data)} bytes")
    return data


def _check_sign(sign: object, where: str = "sign") -> int:
    if isinstance(sign, bool) or sign not in (1, -1):
        raise ConfigError(f"{where} must be +1 or -1, got {sign!r}")
    return 1 if sign == 1 else -1


def _keystream(key: bytes, counter_block: bytes, nbytes: int) -> bytes:
    """Return ``nbytes`` of AES-256-CTR keystream from ``counter_block`` with OpenSSL's CTR mode
    (private: the reference the fast path is tested against; tested against NIST SP 800-38A)."""
    key_b = _check_seed(key)
    if len(counter_block) != _BLOCK_SIZE:
        raise ConfigError(f"counter_block must be {_BLOCK_SIZE} bytes, got {len(counter_block)}")
    out = bytearray(nbytes)
    if nbytes:
        enc = keystream.ctr_encryptor(key_b, bytes(counter_block))
        enc.update_into(keystream.zero_input(nbytes), memoryview(out))
    return bytes(out)


class MaskPRG:
    """Expands 32-byte seeds into masks of ``length`` words of ``bits`` bits (see module doc).

    One instance serves any number of seeds of the same shape and holds no per-call state, so it
    may be shared between threads. ``threads`` fixes the thread count of every call (default:
    :func:`mask_threads` at each call); ``chunk_bytes`` is the generate-and-add chunk (a multiple
    of 16, at least 64; only tests and benchmarks change it). Neither changes any output.
    """

    __slots__ = ("_bits", "_chunk_words", "_dtype", "_length", "_threads")

    def __init__(
        self,
        length: int,
        bits: int,
        *,
        threads: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        """Prepare a PRG producing ``length`` words of ``bits`` bits.

        Raises:
            ConfigError: ``length`` is not an int >= 1, ``bits`` is not 32 or 64, ``threads`` is
                not None or an int >= 1, or ``chunk_bytes`` is not a multiple of 16 >= 64.
        """
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"length must be an int >= 1, got {length!r}")
        if isinstance(bits, bool) or bits not in _DTYPES:
            raise ConfigError(f"bits must be 32 or 64, got {bits!r}")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ConfigError(f"threads must be None or an int >= 1, got {threads!r}")
        if (
            isinstance(chunk_bytes, bool)
            or not isinstance(chunk_bytes, int)
            or chunk_bytes < _MIN_CHUNK
            or chunk_bytes % _BLOCK_SIZE
        ):
            raise ConfigError(
                f"chunk_bytes must be a multiple of {_BLOCK_SIZE} and >= {_MIN_CHUNK}, got "
                f"{chunk_bytes!r}"
            )
        self._length = length
        self._bits = bits
        self._dtype = np.dtype(_DTYPES[bits])
        self._threads = threads
        self._chunk_words = chunk_bytes // self._dtype.itemsize

    @property
    def length(self) -> int:
        """Number of words per mask."""
        return self._length

    @property
    def bits(self) -> int:
        """Word size in bits (32 or 64); arithmetic on masks is modulo ``2**bits``."""
        return self._bits

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        """The NumPy dtype of masks (``uint32`` or ``uint64``)."""
        return self._dtype

    def _check_array(self, name: str, arr: object) -> MaskArray:
        if not isinstance(arr, np.ndarray):
            raise ConfigError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
        if arr.dtype != self._dtype:
            raise ConfigError(f"{name} must have dtype {self._dtype}, got {arr.dtype}")
        if arr.shape != (self._length,):
            raise ConfigError(f"{name} must have shape ({self._length},), got {arr.shape}")
        return arr

    def _check_target(self, name: str, arr: object) -> MaskArray:
        target = self._check_array(name, arr)
        if not target.flags.writeable:
            raise ConfigError(f"{name} must be writeable")
        return target

    def _thread_count(self) -> int:
        # Small vectors stay on the calling thread: handing work to a pool costs tens of us.
        if self._length * self._dtype.itemsize < PARALLEL_MIN_BYTES:
            return 1
        return self._threads if self._threads is not None else mask_threads()

    def expand(self, seed: bytes, out: MaskArray | None = None) -> MaskArray:
        """Return the mask ``PRG(seed)``: ``length`` little-endian words of the AES-256-CTR
        keystream under key ``seed`` with a zero initial counter block.

        If ``out`` is given (C-contiguous, writeable, dtype and shape of this PRG) it is filled
        in place and returned; otherwise a new array is returned.

        Raises:
            InvalidKeyError: ``seed`` is not exactly 32 bytes.
            ConfigError: ``out`` has the wrong type, dtype, shape, or is read-only or not
                C-contiguous (the message names ``out``).
        """
        seed_b = _check_seed(seed)
        if out is None:
            arr: MaskArray = np.empty(self._length, dtype=self._dtype)
        else:
            arr = self._check_target("out", out)
            if not arr.flags.c_contiguous:
                raise ConfigError("out must be C-contiguous")
        keystream.fill(arr, seed_b, self._chunk_words)
        return arr

    def add_into(self, acc: MaskArray, seed: bytes, sign: int = 1) -> None:
        """In place: ``acc = acc + sign * PRG(seed) mod 2**bits`` (``sign`` is +1 or -1).

        Raises:
            InvalidKeyError: ``seed`` is not exactly 32 bytes.
            ConfigError: ``acc`` is not a writeable array of this PRG's dtype and shape
                ``(length,)``, or ``sign`` is not +1 or -1 (the message names the field).
        """
        seed_b = _check_seed(seed)
        target = self._check_target("acc", acc)
        terms = [(seed_b, _check_sign(sign))]
        keystream.add_terms(target, terms, None, self._chunk_words, 1)

    def add_many_into(
        self, acc: MaskArray, terms: Iterable[MaskTerm], *, base: MaskArray | None = None
    ) -> None:
        """In place: ``acc = (base if given, else acc) + sum(sign * PRG(seed) for seed, sign in
        terms) mod 2**bits``, bit for bit the result of one :meth:`add_into` per term, in one
        chunked pass spread over the threads. With ``base`` the copy into ``acc`` is fused into
        the pass (``acc`` may then be uninitialised, e.g. ``numpy.empty``); with no terms it is a
        plain copy. Nothing is written when an argument is refused.

        Raises:
            InvalidKeyError: a seed is not exactly 32 bytes.
            ConfigError: ``acc`` is not a writeable array of this PRG's dtype and shape, ``base``
                has the wrong type, dtype or shape or overlaps ``acc`` without being it, or a
                term is not a (seed, sign) pair with sign +1 or -1 (the message names
                ``terms[i]``).
        """
        target = self._check_target("acc", acc)
        checked: list[tuple[bytes, int]] = []
        for index, term in enumerate(terms):
            if not isinstance(term, tuple) or len(term) != 2:
                raise ConfigError(f"terms[{index}] must be a (seed, sign) pair, got {term!r}")
            seed, sign = term
            checked.append((_check_seed(seed), _check_sign(sign, f"terms[{index}] sign")))
        source: MaskArray | None = None
        if base is not None:
            source = self._check_array("base", base)
            if source is target:
                source = None
            elif np.may_share_memory(source, target):
                raise ConfigError("base must be acc itself or not overlap acc")
        keystream.add_terms(target, checked, source, self._chunk_words, self._thread_count())

    def discard(self, seeds: Iterable[bytes]) -> None:
        """Generate the keystream of every seed into scratch buffers and discard it, with the
        chunks and threads :meth:`add_many_into` would use for the same seeds: its keystream
        floor, for benchmarks. It produces nothing.

        Raises:
            InvalidKeyError: a seed is not exactly 32 bytes.
        """
        keys = [_check_seed(seed) for seed in seeds]
        itemsize = self._dtype.itemsize
        threads = self._thread_count()
        keystream.discard(keys, self._length, itemsize, self._chunk_words, threads)

    def __repr__(self) -> str:
        return f"MaskPRG(length={self._length}, bits={self._bits})"


def sum_into(acc: MaskArray, vectors: Sequence[MaskArray], *, threads: int | None = None) -> None:
    """In place: ``acc = acc + sum(vectors) mod 2**bits`` in one chunked pass split into slabs
    over the threads (bit for bit the result of adding the vectors one after the other;
    ``threads`` defaults to :func:`mask_threads`).

    Raises:
        ConfigError: ``acc`` is not a writeable 1-D ``uint32``/``uint64`` array, or a vector does
            not have its dtype and shape (the message names ``vectors[i]``).
    """
    if not isinstance(acc, np.ndarray) or acc.ndim != 1 or acc.dtype not in (np.uint32, np.uint64):
        raise ConfigError("acc must be a 1-D numpy array of dtype uint32 or uint64")
    if not acc.flags.writeable:
        raise ConfigError("acc must be writeable")
    for index, vector in enumerate(vectors):
        if not isinstance(vector, np.ndarray) or vector.dtype != acc.dtype:
            raise ConfigError(f"vectors[{index}] must be a numpy array of dtype {acc.dtype}")
        if vector.shape != acc.shape:
            raise ConfigError(f"vectors[{index}] must have shape {acc.shape}, got {vector.shape}")
    if not vectors:
        return
    chunk = CHUNK_BYTES // acc.dtype.itemsize
    count = threads if threads is not None else mask_threads()

    def work(lo: int, hi: int) -> None:
        for a in range(lo, hi, chunk):
            b = min(a + chunk, hi)
            dst = acc[a:b]
            for vector in vectors:
                np.add(dst, vector[a:b], out=dst)

    slabs = plan_slabs(acc.shape[0], acc.dtype.itemsize, chunk, count)
    run_parallel([partial(work, lo, hi) for lo, hi in slabs], count)


def expand_mask(seed: bytes, length: int, bits: int) -> MaskArray:
    """Return ``MaskPRG(length, bits).expand(seed)`` (a convenience for one-off masks).

    Raises:
        InvalidKeyError: ``seed`` is not exactly 32 bytes.
        ConfigError: ``length`` < 1 or ``bits`` not in {32, 64}.
    """
    return MaskPRG(length, bits).expand(seed)
