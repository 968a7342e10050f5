"""The server's CKKS upload handler (transport/server_uploads.py), without sockets: the stream is
fed once, frame by frame, into the round's running sum (never buffered whole, never added twice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tenseal")

from secure_fl.he import SecretContext
from secure_fl.he.aggregate import CiphertextSummer
from secure_fl.rounds.ckks import CkksServerRound, CkksSiteRound
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes
from secure_fl.transport.config import Limits, RosterEntry
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.server_rounds import CkksRound
from secure_fl.transport.server_uploads import UploadHandlers

SLOTS = 4096


def _stream(
    header: pb.PayloadHeader, payload: bytes, piece: int, before_each: Any
) -> Iterator[bytes]:
    """The serialised chunks of ``payload``; ``before_each()`` runs before each is handed over."""
    for raw in iter_chunk_bytes(header, payload, piece):
        before_each()
        yield raw


class _Coordinator:
    def __init__(self, ck: CkksRound) -> None:
        self.ck = ck

    def check_ckks(self, site: int, round_id: int, now: float) -> CkksRound:
        if site in self.ck.accepted:
            raise RejectedError("FAILED_PRECONDITION", "ciphertexts already uploaded")
        return self.ck

    def ckks_upload(self, site: int, round_id: int, now: float) -> None:
        self.ck.accepted.add(site)


class _Handlers(UploadHandlers):
    def __init__(self, ck: CkksRound, public: Any) -> None:
        self.config = SimpleNamespace(limits=Limits())  # type: ignore[assignment]
        self._cond = threading.Condition()
        self._coord = _Coordinator(ck)  # type: ignore[assignment]
        self._clock = time.monotonic
        self._ckks_public = public
        self.counted: list[int] = []

    def _call(self, fn: Any, *args: Any) -> Any:
        return fn(*args, self._clock())

    def _count(self, site: int, received: int, sent: int, *, model: bool = False) -> None:
        self.counted.append(received)


def test_a_ckks_upload_is_added_frame_by_frame_once(
    secret: SecretContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = AggregationSpec(protocol="ckks", chunk_ciphertexts=1)
    plan = plan_round(spec, {1: 1.0, 2: 3.0}, vector_length=3 * SLOTS, round_id=5)
    server = CkksServerRound(plan, secret.public(), names={1: "a", 2: "b"})
    setups = server.setup()
    layout = server.layout
    ck = CkksRound(server, layout, {s: plan.normalised[s] for s in plan.ids}, {})
    handlers = _Handlers(ck, secret.public())
    adds: list[str] = []
    real_add = CiphertextSummer.add

    def counting_add(self: CiphertextSummer, site: str, frame: bytes) -> None:
        adds.append(site)
        real_add(self, site, frame)

    monkeypatch.setattr(CiphertextSummer, "add", counting_add)
    for site, name in ((1, "a"), (2, "b")):
        half = CkksSiteRound(site, secret=secret, name=name)
        upload = half.on_setup(
            setups[site], update=np.ones(3 * SLOTS), reported_weight=plan.weights[site]
        )
        header = pb.PayloadHeader(
            kind=pb.CKKS_CIPHERTEXT,
            round_id=5,
            length=layout.chunks,
            ckks=pb.CkksPayloadInfo(
                context_sha256=setups[site].context_sha256,
                ciphertexts=layout.ciphertexts,
                weight=plan.normalised[site],
            ),
        )
        payload = upload.payload  # type: ignore[union-attr]
        piece = len(payload) // 7 + 1
        seen: list[int] = []
        # what the sum already holds of this upload whenever the next piece is read
        stream = _stream(header, payload, piece, lambda n=name, out=seen: out.append(adds.count(n)))
        entry = RosterEntry(name, site)
        ack = handlers._upload_ciphertext(entry, stream, None)  # type: ignore[arg-type]
        assert isinstance(ack, pb.Ack) and ack.phase == "ckks_upload"
        # one homomorphic add per frame, and frames were added while the stream still ran
        assert adds.count(name) == layout.chunks
        assert seen[-1] > 0 and seen[1] == 0
        assert server.sum.peak_buffered < len(payload)
    assert ck.accepted == {1, 2} and handlers.counted and server.expected == frozenset()
    # a second upload of a site is refused at its header, before any data is taken
    read: list[int] = []
    again_stream = _stream(header, payload, piece, lambda: read.append(1))
    with pytest.raises(RejectedError) as again:
        handlers._upload_ciphertext(RosterEntry("b", 2), again_stream, None)  # type: ignore[arg-type]
    assert again.value.code == "FAILED_PRECONDITION" and len(read) == 1
    assert adds.count("b") == layout.chunks


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate()
