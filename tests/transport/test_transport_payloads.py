"""Tests for the copy- and hash-saving paths of transport/chunks.py and transport/tensors.py."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from secure_fl.errors import InvalidUpdateError
from secure_fl.transport import tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes, receive_raw
from secure_fl.transport.errors import RejectedError


def _accept(header: pb.PayloadHeader) -> None:
    return None


def test_known_sha256_is_reused_and_gives_the_same_stream() -> None:
    data = bytes(range(256)) * 40
    header = pb.PayloadHeader(kind=pb.MODEL)
    computed = list(iter_chunk_bytes(header, data, 1000))
    given = list(iter_chunk_bytes(header, data, 1000, sha256=hashlib.sha256(data).digest()))
    assert given == computed
    _, out, _ = receive_raw(iter(given), max_chunk=1000, max_total=len(data), check_header=_accept)
    assert bytes(out) == data


def test_a_wrong_known_sha256_is_refused_by_the_receiver() -> None:
    data = b"x" * 3000
    stream = iter_chunk_bytes(pb.PayloadHeader(kind=pb.MODEL), data, 1000, sha256=bytes(32))
    with pytest.raises(RejectedError, match="checksum"):
        receive_raw(stream, max_chunk=1000, max_total=len(data), check_header=_accept)
    with pytest.raises(ValueError, match="sha256"):
        list(iter_chunk_bytes(pb.PayloadHeader(kind=pb.MODEL), data, 1000, sha256=b"short"))


def _reference_dumps(model: dict[str, np.ndarray]) -> bytes:
    """The layout of transport/tensors.py written the plain way (tobytes per tensor)."""
    entries, blobs, offset = [], [], 0
    for name, array in model.items():
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entries.append(
            {
                "name": name,
                "dtype": array.dtype.name,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": len(data),
            }
        )
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return b"".join([tensors.MAGIC, len(header).to_bytes(8, "little"), header, *blobs])


def _reference_digest(model: dict[str, np.ndarray]) -> bytes:
    """content_digest's definition computed on whole float64 copies."""
    digest = hashlib.sha256(tensors.CONTENT_DOMAIN)
    digest.update(len(model).to_bytes(8, "little"))
    for name in sorted(model):
        values = np.array(model[name], dtype="<f8", order="C", copy=True).reshape(-1)
        values[values == 0.0] = 0.0
        raw = name.encode()
        digest.update(len(raw).to_bytes(8, "little") + raw + values.size.to_bytes(8, "little"))
        digest.update(values.tobytes())
    return digest.digest()


def _awkward_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    model = {
        "long": rng.standard_normal(100_003).astype(np.float32),  # several digest pieces
        "f64": rng.standard_normal((70, 3)),
        "half": rng.standard_normal((4, 4, 4)).astype(np.float16),
        "scalar": np.array(-0.0, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "transposed": rng.standard_normal((33, 65)).astype(np.float32).T,
        "big-endian": rng.standard_normal(40_000).astype(">f4"),
    }
    model["f64"][3, 1] = -0.0
    model["long"][99_999] = -0.0
    return model


def test_dumps_writes_the_reference_layout() -> None:
    model = _awkward_model()
    blob = tensors.dumps(model)
    assert blob == _reference_dumps(model)
    back = tensors.loads(blob)
    assert list(back) == list(model)
    for name, array in model.items():
        np.testing.assert_array_equal(back[name], array)


def test_content_digest_equals_the_whole_vector_definition() -> None:
    model = _awkward_model()
    assert tensors.content_digest(model) == _reference_digest(model)
    flipped = dict(model)
    flipped["long"] = model["long"].copy()
    flipped["long"][99_999] = 0.0  # -0.0 and 0.0 are one value
    assert tensors.content_digest(flipped) == tensors.content_digest(model)


@pytest.mark.parametrize("position", [0, 32_767, 32_768, 100_002])
def test_content_digest_finds_a_non_finite_value_in_any_piece(position: int) -> None:
    values = np.ones(100_003, dtype=np.float32)
    values[position] = np.inf
    with pytest.raises(InvalidUpdateError, match="NaN or infinite"):
        tensors.content_digest({"w": values})
