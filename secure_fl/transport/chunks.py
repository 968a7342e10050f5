"""Large payloads as streams of bounded chunks with a SHA-256 checksum.

A payload travels as ``Chunk(header)``, then ``Chunk(data)`` pieces of at most ``chunk_bytes``
each, then ``Chunk(trailer)`` carrying the SHA-256 of the concatenated data. Nothing may follow the
trailer. No single gRPC message ever holds the whole payload, so the message-size limit of both
ends can stay small (a few MiB) whatever the model size.

Guarantee of :class:`PayloadReceiver`: it returns a payload only when the header was accepted by
the caller's check, every chunk was within the chunk limit, the data length equals the declared
``total_bytes`` (itself within ``max_total``, so memory is bounded before any data arrives) and the
checksum matches; otherwise it raises :class:`RejectedError` with INVALID_ARGUMENT (malformed,
truncated, checksum mismatch) or RESOURCE_EXHAUSTED (a limit exceeded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

from google.protobuf.message import DecodeError

from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.errors import RejectedError

DEFAULT_CHUNK_BYTES = 1 << 20
# A serialised Chunk holding only ``data`` is this tag, the varint length, then the bytes.
_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)

#: Called with the header; returns the payload size it accepts (must equal header.total_bytes)
#: or raises RejectedError.
HeaderCheck = Callable[[pb.PayloadHeader], None]


def iter_chunks(
    header: pb.PayloadHeader, data: bytes | bytearray | memoryview, chunk_bytes: int
) -> Iterator[pb.Chunk]:
    """Yield the chunk stream of ``data`` (header with ``total_bytes`` filled in, data pieces of at
    most ``chunk_bytes``, trailer with the SHA-256)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    view = memoryview(data).cast("B")
    head = pb.PayloadHeader()
    head.CopyFrom(header)
    head.total_bytes = len(view)
    yield pb.Chunk(header=head)
    digest = hashlib.sha256()
    for start in range(0, len(view), chunk_bytes):
        piece = view[start : start + chunk_bytes]
        digest.update(piece)
        yield pb.Chunk(data=bytes(piece))
    yield pb.Chunk(trailer=pb.PayloadTrailer(sha256=digest.digest()))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _data_view(raw: bytes) -> memoryview | None:
    """The data of a serialised Chunk that holds exactly one ``data`` field, without copying it;
    None for anything else (the caller then parses with protobuf)."""
    if len(raw) < 2 or raw[0] != _DATA_TAG:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(raw) and pos <= 10:
        byte = raw[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return memoryview(raw)[pos:] if pos + length == len(raw) else None
        shift += 7
    return None


def iter_chunk_bytes(
    header: pb.PayloadHeader,
    data: bytes | bytearray | memoryview,
    chunk_bytes: int,
    *,
    sha256: bytes | None = None,
) -> Iterator[bytes]:
    """The serialised form of :func:`iter_chunks` (the same bytes protobuf produces), built with
    one copy of the data: for calls whose request serializer is the identity.

    ``sha256`` is the SHA-256 of ``data`` when the caller already computed it (a model blob is
    hashed for its digest anyway); it is then not computed a second time. A wrong value makes
    every receiver refuse the stream (checksum mismatch). Errors: ValueError for ``chunk_bytes``
    < 1 or a ``sha256`` that is not 32 bytes."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if sha256 is not None and len(sha256) != hashlib.sha256().digest_size:
        raise ValueError(f"sha256 must be 32 bytes, got {len(sha256)}")
    view = memoryview(data).cast("B")
    head = pb.PayloadHeader()
    head.CopyFrom(header)
    head.total_bytes = len(view)
    yield pb.Chunk(header=head).SerializeToString()
    digest = hashlib.sha256() if sha256 is None else None
    for start in range(0, len(view), chunk_bytes):
        piece = view[start : start + chunk_bytes]
        if digest is not None:
            digest.update(piece)
        yield b"".join((bytes((_DATA_TAG,)), _varint(len(piece)), piece))
    checksum = digest.digest() if digest is not None else bytes(sha256 or b"")
    yield pb.Chunk(trailer=pb.PayloadTrailer(sha256=checksum)).SerializeToString()


class PayloadReceiver:
    """Reassemble one chunk stream, enforcing the limits in the module docstring.

    ``check_header`` validates the header (kind, round, phase, declared sizes) before any data is
    accepted; it raises :class:`RejectedError` to refuse the stream.
    """

    def __init__(self, *, max_chunk: int, max_total: int, check_header: HeaderCheck) -> None:
        self._max_chunk = max_chunk
        self._max_total = max_total
        self._check = check_header
        self._header: pb.PayloadHeader | None = None
        self._buf = bytearray()
        self._filled = 0
        self._digest = hashlib.sha256()
        self._done = False
        self.bytes_seen = 0

    def feed_raw(self, raw: bytes) -> None:
        """Parse one serialised Chunk and :meth:`feed` it (INVALID_ARGUMENT if undecodable).

        A chunk that holds only data is taken without a protobuf parse (and without a copy)."""
        self.bytes_seen += len(raw)
        view = _data_view(raw)
        if view is not None:
            if self._done:
                raise RejectedError("INVALID_ARGUMENT", "data after the payload trailer")
            self._feed_data(view)
            return
        try:
            chunk = pb.Chunk.FromString(raw)
        except DecodeError as exc:
            raise RejectedError("INVALID_ARGUMENT", "chunk is not a valid Chunk message") from exc
        self.feed(chunk)

    def feed(self, chunk: pb.Chunk) -> None:
        """Consume one chunk of the stream."""
        part = chunk.WhichOneof("part")
        if self._done:
            raise RejectedError("INVALID_ARGUMENT", "data after the payload trailer")
        if part == "header":
            if self._header is not None:
                raise RejectedError("INVALID_ARGUMENT", "second payload header in one stream")
            header = chunk.header
            if header.total_bytes > self._max_total:
                raise RejectedError(
                    "RESOURCE_EXHAUSTED",
                    f"payload of {header.total_bytes} bytes exceeds the limit of "
                    f"{self._max_total} bytes",
                )
            self._check(header)
            self._header = header
            self._buf = bytearray(header.total_bytes)
            return
        if self._header is None:
            raise RejectedError("INVALID_ARGUMENT", "payload stream must start with a header")
        if part == "data":
            self._feed_data(chunk.data)
            return
        if part == "trailer":
            if self._filled != len(self._buf):
                raise RejectedError(
                    "INVALID_ARGUMENT",
                    f"payload truncated: {self._filled} of {len(self._buf)} bytes before the "
                    "trailer",
                )
            if chunk.trailer.sha256 != self._digest.digest():
                raise RejectedError("INVALID_ARGUMENT", "payload checksum (SHA-256) mismatch")
            self._done = True
            return
        raise RejectedError("INVALID_ARGUMENT", "empty chunk")

    def _feed_data(self, piece: bytes | memoryview) -> None:
        if self._header is None:
            raise RejectedError("INVALID_ARGUMENT", "payload stream must start with a header")
        if len(piece) > self._max_chunk:
            raise RejectedError(
                "RESOURCE_EXHAUSTED",
                f"chunk of {len(piece)} bytes exceeds the limit of {self._max_chunk} bytes",
            )
        end = self._filled + len(piece)
        if end > len(self._buf):
            raise RejectedError(
                "INVALID_ARGUMENT", f"payload longer than its declared {len(self._buf)} bytes"
            )
        self._buf[self._filled : end] = piece
        self._filled = end
        self._digest.update(piece)

    @property
    def digest(self) -> bytes:
        """The SHA-256 of the data, once the stream is complete and verified (else empty)."""
        return self._digest.digest() if self._done else b""

    def result(self) -> tuple[pb.PayloadHeader, bytearray]:
        """The header and the verified data. Errors: INVALID_ARGUMENT if the stream was cut."""
        if self._header is None or not self._done:
            raise RejectedError("INVALID_ARGUMENT", "payload stream ended before its trailer")
        return self._header, self._buf


def receive_raw(
    stream: Iterable[bytes], *, max_chunk: int, max_total: int, check_header: HeaderCheck
) -> tuple[pb.PayloadHeader, bytearray, int]:
    """Reassemble a stream of serialised chunks; returns (header, data, bytes received)."""
    receiver = PayloadReceiver(max_chunk=max_chunk, max_total=max_total, check_header=check_header)
    for raw in stream:
        receiver.feed_raw(raw)
    header, data = receiver.result()
    return header, data, receiver.bytes_seen


def receive(
    stream: Iterable[pb.Chunk], *, max_chunk: int, max_total: int, check_header: HeaderCheck
) -> tuple[pb.PayloadHeader, bytearray]:
    """Reassemble a stream of parsed chunks."""
    receiver = PayloadReceiver(max_chunk=max_chunk, max_total=max_total, check_header=check_header)
    for chunk in stream:
        receiver.feed(chunk)
    return receiver.result()
