"""How a flat update is cut into full ciphertexts, and ciphertexts into bounded chunks.

The whole update is one float64 vector (:func:`secure_fl.encoding.flatten`): layer boundaries play no
part, so no ciphertext is wasted on a small layer. Ciphertext ``j`` holds values
``[j * slots, (j + 1) * slots)``; every ciphertext but the last uses all ``slots`` slots.

Ciphertexts travel in **chunks** of at most ``chunk_ciphertexts`` ciphertexts, chunk ``c`` holding
ciphertexts ``[c * chunk_ciphertexts, (c + 1) * chunk_ciphertexts)``. Chunks are the streaming unit:
each party touches one chunk at a time, so the ciphertext memory a party holds is bounded by a few
chunks whatever the model size (see :mod:`secure_fl.he.aggregate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError

#: Ciphertexts per chunk unless configured: 64 ciphertexts, 262 144 values at N = 8192, about 7.5 MB
#: on the wire and 8.4 MB in memory per chunk.
DEFAULT_CHUNK_CIPHERTEXTS = 64

#: Largest number of values one frame may describe (its header stores counts as uint32).
MAX_CHUNK_VALUES = 2**32 - 1


@dataclass(frozen=True)
class Layout:
    """The ciphertext layout of one round: ``size`` values, ``slots`` per ciphertext, chunks of at
    most ``chunk_ciphertexts`` ciphertexts.

    Errors: ConfigError when a field is not a positive integer or a chunk would not fit a frame.
    """

    size: int
    slots: int
    chunk_ciphertexts: int = DEFAULT_CHUNK_CIPHERTEXTS

    def __post_init__(self) -> None:
        for field_name in ("size", "slots", "chunk_ciphertexts"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Layout.{field_name} must be an integer >= 1, got {value!r}")
        if self.slots * self.chunk_ciphertexts > MAX_CHUNK_VALUES:
            raise ConfigError(
                f"chunk_ciphertexts={self.chunk_ciphertexts} makes chunks of more than "
                f"{MAX_CHUNK_VALUES} values"
            )

    @property
    def ciphertexts(self) -> int:
        """Ciphertexts per site: ``ceil(size / slots)``."""
        return -(-self.size // self.slots)

    @property
    def chunks(self) -> int:
        """Chunks per site: ``ceil(ciphertexts / chunk_ciphertexts)``."""
        return -(-self.ciphertexts // self.chunk_ciphertexts)

    @property
    def chunk_values(self) -> int:
        """Values in a full chunk."""
        return self.slots * self.chunk_ciphertexts

    def chunk_range(self, index: int) -> tuple[int, int]:
        """The value range ``[start, stop)`` of chunk ``index``.

        Errors: ConfigError for an index outside ``[0, chunks)``.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.chunks:
            raise ConfigError(f"chunk index must be in [0, {self.chunks}), got {index!r}")
        start = index * self.chunk_values
        return start, min(start + self.chunk_values, self.size)

    def pieces(self, index: int) -> list[int]:
        """Values in each ciphertext of chunk ``index`` (all ``slots`` but possibly the very last)."""
        start, stop = self.chunk_range(index)
        return [min(self.slots, stop - s) for s in range(start, stop, self.slots)]


def split_chunk(values: npt.NDArray[np.float64], slots: int) -> Iterator[npt.NDArray[np.float64]]:
    """Yield consecutive views of ``values`` of ``slots`` values (the last may be shorter)."""
    for start in range(0, values.shape[0], slots):
        yield values[start : start + slots]
