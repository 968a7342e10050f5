"""What a site's sans-IO driver asks its transport to send: unary calls and chunk-stream uploads.

The driver (:mod:`.site_driver`) returns these in order; the gRPC shell (:mod:`.site`) sends them
one by one and stops at the first failure. Everything a reply carries was checked against the
site's policy before the reply was built: a transport only sends, it decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from secure_fl.transport._generated import federation_pb2 as pb

#: The unary RPCs a site calls with a message (the Federation service of federation.proto).
UNARY_RPCS = (
    "ReportUpdateReady",
    "ReportMetrics",
    "SendAdvertiseKeys",
    "SendRevealNonce",
    "SendShareKeys",
    "SendConsistencySignature",
    "SendUnmaskResponse",
)
#: The chunk-stream uploads.
UPLOAD_RPCS = ("UploadUpdate", "UploadMaskedInput", "UploadCiphertext")


@dataclass(frozen=True)
class Call:
    """Call the unary RPC ``rpc`` (one of :data:`UNARY_RPCS`) with ``message``. ``optional``:
    a refusal by the server (not a lost connection) is logged and the next reply is sent anyway
    (metrics: a server without ``ReportMetrics`` must not keep the site out of every round)."""

    rpc: str
    message: Any = field(repr=False)
    optional: bool = False

    def __post_init__(self) -> None:
        if self.rpc not in UNARY_RPCS:
            raise ValueError(f"rpc must be one of {UNARY_RPCS}, got {self.rpc!r}")


@dataclass(frozen=True)
class Upload:
    """Stream ``data`` with ``header`` (a chunk stream, :mod:`.chunks`) to ``rpc`` (one of
    :data:`UPLOAD_RPCS`)."""

    rpc: str
    header: pb.PayloadHeader
    data: bytes | bytearray | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        if self.rpc not in UPLOAD_RPCS:
            raise ValueError(f"rpc must be one of {UPLOAD_RPCS}, got {self.rpc!r}")


Reply = Call | Upload
