"""Pseudo-random generator for secure-aggregation masks: AES-256-CTR keystream as integers.

Guarantee: ``expand(seed)`` is the AES-256-CTR keystream under key ``seed`` (32 bytes) with
initial counter block ``0^128`` (the 128-bit block is incremented as a big-endian integer),
read as little-endian ``uint32`` or ``uint64`` words. AES-256 in counter mode is a PRG under the
standard assumption that AES is a pseudo-random permutation: for a uniformly random secret seed
the output is indistinguishable from uniform words in ``[0, 2**bits)`` (up to the PRP/PRF
switching distance, negligible for any mask length used here), so ``x + PRG(seed) mod 2**bits``
hides ``x``. Each seed must be used for ONE mask only; the protocol ensures this because seeds
are derived from fresh per-round keys. The output is fully determined by the seed on every
platform (it is the reference definition both sides of a pairwise mask must agree on).

Speed: the keystream is written by OpenSSL (AES-NI) straight into the NumPy array's memory,
with no Python loop over elements and no per-call allocation in :meth:`MaskPRG.add_into`. For
4.8 M ``uint32`` words on a 2-core x86-64 machine with AES-NI: ``expand`` about 3 ms,
``add_into`` about 4.5 ms (``uint64``: about 5.5 ms and 8 ms).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secure_fl.errors import ConfigError, InvalidKeyError

__all__ = ["SEED_SIZE", "MaskArray", "MaskPRG", "expand_mask"]

SEED_SIZE = 32
"""Size in bytes of a PRG seed (an AES-256 key)."""

MaskArray = npt.NDArray[np.unsignedinteger[Any]]
"""A 1-D ``uint32`` or ``uint64`` array holding a mask or a masked vector."""

_BLOCK_SIZE = 16
_ZERO_BLOCK = bytes(_BLOCK_SIZE)
_DTYPES: dict[int, type[np.unsignedinteger[Any]]] = {32: np.uint32, 64: np.uint64}

# One shared, read-only all-zero input buffer (the keystream is AES-CTR applied to zeros). It is
# grown to the largest size requested so far and shared by every MaskPRG, so n PRG instances do
# not hold n copies. ``bytes(n)`` is calloc-backed, so untouched pages cost no memory.
_zeros: bytes = b""
_zeros_lock = threading.Lock()


def _zero_input(nbytes: int) -> memoryview:
    global _zeros
    buf = _zeros
    if len(buf) < nbytes:
        with _zeros_lock:
            if len(_zeros) < nbytes:
                _zeros = bytes(nbytes)
            buf = _zeros
    return memoryview(buf)[:nbytes]


def _check_seed(seed: object) -> bytes:
    if not isinstance(seed, bytes | bytearray | memoryview):
        raise InvalidKeyError(f"seed must be bytes, got {type(seed).__name__}")
    data = bytes(seed)
    if len(data) != SEED_SIZE:
        raise InvalidKeyError(f"seed must be {SEED_SIZE} bytes, got {len(data)} bytes")
    return data


def _keystream_into(key: bytes, counter_block: bytes, out: memoryview) -> None:
    """Write the AES-256-CTR keystream for ``key`` / ``counter_block`` into ``out`` (bytes view).

    In cryptography >= 42 the CTR context reports a block size of 1, so ``update_into`` needs an
    output buffer of exactly ``len(data)`` bytes, which lets it write into a NumPy array.
    """
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter_block)).encryptor()
    written = encryptor.update_into(_zero_input(out.nbytes), out)
    if written != out.nbytes:  # pragma: no cover - CTR is a stream mode; defensive only
        raise RuntimeError(f"AES-CTR wrote {written} of {out.nbytes} bytes")


def _keystream(key: bytes, counter_block: bytes, nbytes: int) -> bytes:
    """Return ``nbytes`` of AES-256-CTR keystream (private; tested against NIST SP 800-38A)."""
    key_b = _check_seed(key)
    if len(counter_block) != _BLOCK_SIZE:
        raise ConfigError(f"counter_block must be {_BLOCK_SIZE} bytes, got {len(counter_block)}")
    out = bytearray(nbytes)
    if nbytes:
        _keystream_into(key_b, bytes(counter_block), memoryview(out))
    return bytes(out)


class MaskPRG:
    """Expands 32-byte seeds into masks of ``length`` words of ``bits`` bits (see module doc).

    One instance serves any number of seeds of the same shape; it keeps a preallocated scratch
    array for :meth:`add_into`. Not thread-safe: use one instance per thread.
    """

    __slots__ = ("_bits", "_dtype", "_length", "_nbytes", "_scratch")

    def __init__(self, length: int, bits: int) -> None:
        """Prepare a PRG producing ``length`` words of ``bits`` bits.

        Raises:
            ConfigError: ``length`` is not an int >= 1, or ``bits`` is not 32 or 64.
        """
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"length must be an int >= 1, got {length!r}")
        if isinstance(bits, bool) or bits not in _DTYPES:
            raise ConfigError(f"bits must be 32 or 64, got {bits!r}")
        self._length = length
        self._bits = bits
        self._dtype = np.dtype(_DTYPES[bits])
        self._nbytes = length * self._dtype.itemsize
        self._scratch: MaskArray | None = None

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
        if not arr.flags.writeable:
            raise ConfigError(f"{name} must be writeable")
        return arr

    def _fill(self, seed: bytes, arr: MaskArray) -> None:
        # arr is C-contiguous with the PRG's dtype and length (checked by the callers).
        _keystream_into(seed, _ZERO_BLOCK, arr.data.cast("B"))
        if sys.byteorder == "big":  # pragma: no cover - keystream words are little-endian
            arr.byteswap(inplace=True)

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
            arr = self._check_array("out", out)
            if not arr.flags.c_contiguous:
                raise ConfigError("out must be C-contiguous")
        self._fill(seed_b, arr)
        return arr

    def add_into(self, acc: MaskArray, seed: bytes, sign: int = 1) -> None:
        """In place: ``acc = acc + sign * PRG(seed) mod 2**bits`` (``sign`` is +1 or -1).

        Raises:
            InvalidKeyError: ``seed`` is not exactly 32 bytes.
            ConfigError: ``acc`` is not a writeable array of this PRG's dtype and shape
                ``(length,)``, or ``sign`` is not +1 or -1 (the message names the field).
        """
        seed_b = _check_seed(seed)
        target = self._check_array("acc", acc)
        if isinstance(sign, bool) or sign not in (1, -1):
            raise ConfigError(f"sign must be +1 or -1, got {sign!r}")
        scratch = self._scratch
        if scratch is None:
            scratch = np.empty(self._length, dtype=self._dtype)
            self._scratch = scratch
        self._fill(seed_b, scratch)
        if sign == 1:
            np.add(target, scratch, out=target)
        else:
            np.subtract(target, scratch, out=target)

    def __repr__(self) -> str:
        return f"MaskPRG(length={self._length}, bits={self._bits})"


def expand_mask(seed: bytes, length: int, bits: int) -> MaskArray:
    """Return ``MaskPRG(length, bits).expand(seed)`` (a convenience for one-off masks).

    Raises:
        InvalidKeyError: ``seed`` is not exactly 32 bytes.
        ConfigError: ``length`` < 1 or ``bits`` not in {32, 64}.
    """
    return MaskPRG(length, bits).expand(seed)
