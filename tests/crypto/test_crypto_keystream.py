"""Tests for secure_fl.crypto.keystream: the GCM-computed keystream is the AES-256-CTR keystream."""

from __future__ import annotations

import numpy as np
import pytest

from secure_fl.crypto import keystream
from secure_fl.crypto.keystream import KeyStream, zero_input
from secure_fl.crypto.prg import MaskPRG, _keystream

KEY = bytes(range(32))


def _read(stream: KeyStream, sizes: list[int]) -> bytes:
    out = bytearray(sum(sizes))
    view = memoryview(out)
    pos = 0
    for index, size in enumerate(sizes):
        part = view[pos : pos + size]
        if index == 0:
            stream.first(part)
        else:
            stream.update(zero_input(size), part)
        pos += size
    return bytes(out)


@pytest.mark.parametrize(
    "sizes",
    [[1], [32], [33], [48], [64, 64], [100, 7, 1, 300], [4096] * 5 + [13], [32, 16, 16, 1]],
)
def test_stream_equals_ctr_for_any_chunking(sizes: list[int]) -> None:
    total = sum(sizes)
    expected = _keystream(KEY, bytes(16), total)
    assert _read(KeyStream(KEY, total), sizes) == expected


def test_stream_uses_gcm_past_the_head_and_ctr_for_short_masks() -> None:
    assert KeyStream(KEY, 33)._head == _keystream(KEY, bytes(16), 32)
    assert KeyStream(KEY, 32)._head == b""  # 2 blocks or fewer: CTR alone


def test_stream_falls_back_to_ctr_before_the_gcm_counter_wraps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past 2**32 - 2 GCM blocks the 32-bit GCM counter would wrap while CTR's 128-bit counter
    carries on; such masks (over 64 GiB) use CTR. Checked with the limit lowered to 4 blocks."""
    monkeypatch.setattr(keystream, "_GCM_MAX", 64)
    assert KeyStream(KEY, 32 + 64)._head != b""
    long_stream = KeyStream(KEY, 32 + 65)
    assert long_stream._head == b""
    assert _read(long_stream, [50, 47]) == _keystream(KEY, bytes(16), 97)
    mask = MaskPRG(1000, 32, chunk_bytes=64).expand(KEY)
    reference = np.frombuffer(_keystream(KEY, bytes(16), 4000), dtype="<u4")
    np.testing.assert_array_equal(mask, reference)


def test_discard_runs_every_chunking() -> None:
    keystream.discard([KEY, bytes(32)], 1001, 4, 64, 2)
    keystream.discard([], 1001, 4, 64, 2)
