"""Refused identities, and a misbehaving participant that cannot disturb a running round.

All against a real server process on loopback; the misbehaving party is driven from the test
process with its own (valid, rostered) certificate, next to three real site processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from transport_helpers import (
    Federation,
    assert_matches,
    secure_channel,
    site_channel,
    zeros_like_model,
)

from secure_fl.secagg import Phase, SecAggClient
from secure_fl.transport import convert
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport._generated.federation_pb2_grpc import FederationStub
from secure_fl.transport.chunks import iter_chunks
from secure_fl.transport.config import FEDERATION_PROTOCOL
from secure_fl.transport.provision import issue_site_certificate, load_signing_key, new_ca
from secure_fl.transport.tasks import TaskResult

SERVICE = "/secure_fl.federation.v1.Federation/"


def expect(code: grpc.StatusCode, call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Run ``call`` and return the error details; fail unless it is refused with ``code``."""
    kwargs.setdefault("timeout", 20)
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    error = info.value
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    return str(error.details())


def join(stub: FederationStub) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(protocol_version=FEDERATION_PROTOCOL), timeout=20)


def test_identities_off_the_roster_or_from_another_ca_are_refused(
    federation: Callable[..., Federation],
) -> None:
    fed = federation(
        ["a", "b"],
        rounds=1,
        limits={"rate_per_s": 0.05, "burst": 6, "per_site_concurrency": 2},
    )
    fed.start_server()
    ca_cert = x509.load_pem_x509_certificate((fed.root / "ca" / "ca.crt").read_bytes())
    ca_key: Any = serialization.load_pem_private_key(
        (fed.root / "ca" / "ca.key").read_bytes(), password=None
    )

    # Signed by our CA but not on the roster.
    cert, key = issue_site_certificate(ca_cert, ca_key, "mallory", "x")
    with secure_channel(fed, cert, key) as channel:
        details = expect(
            grpc.StatusCode.PERMISSION_DENIED, FederationStub(channel).Join, pb.JoinRequest()
        )
        assert "not on the roster" in details

    # A roster name, signed by our CA, but not the pinned certificate (a reissued one).
    cert, key = issue_site_certificate(ca_cert, ca_key, "a", "x")
    with secure_channel(fed, cert, key) as channel:
        details = expect(
            grpc.StatusCode.PERMISSION_DENIED, FederationStub(channel).Join, pb.JoinRequest()
        )
        assert "pinned" in details

    # A certificate from another CA: the TLS handshake fails.
    evil_cert, evil_key = new_ca("evil")
    cert, key = issue_site_certificate(evil_cert, evil_key, "a", "evil")
    with secure_channel(fed, cert, key) as channel:
        expect(grpc.StatusCode.UNAVAILABLE, FederationStub(channel).Join, pb.JoinRequest())

    # No client certificate at all: the TLS handshake fails.
    creds = grpc.ssl_channel_credentials(
        root_certificates=(fed.root / "ca" / "ca.crt").read_bytes()
    )
    options = [("grpc.ssl_target_name_override", "secure-fl-server")]
    with grpc.secure_channel(fed.address, creds, options=options) as channel:
        expect(grpc.StatusCode.UNAVAILABLE, FederationStub(channel).Join, pb.JoinRequest())

    # A plaintext client cannot talk to the server at all.
    with grpc.insecure_channel(fed.address) as channel:
        expect(grpc.StatusCode.UNAVAILABLE, FederationStub(channel).Join, pb.JoinRequest())

    # The genuine site is accepted; then its own limits apply.
    with site_channel(fed, "a") as channel:
        stub = FederationStub(channel)
        reply = join(stub)  # token 1 of 6
        assert reply.site_name == "a" and reply.site_id == 1
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.Join,
            pb.JoinRequest(protocol_version="secure_fl/federation/v0"),
        )  # token 2
        poll = pb.PollRequest(session=reply.session, wait_ms=60_000)
        # Three long polls at once: two are admitted (tokens 3, 4), the third is over the
        # per-site concurrency limit (2) and refused at once.
        calls = [stub.Poll.future(poll, timeout=30) for _ in range(3)]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(call.result(timeout=30).WhichOneof("kind"))
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
                assert "in flight" in str(exc.details())
        assert sorted(map(str, outcomes)) == sorted(
            map(str, ["wait", "wait", grpc.StatusCode.RESOURCE_EXHAUSTED])
        )
        join(stub)  # token 5
        join(stub)  # token 6
        details = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Join, pb.JoinRequest())
        assert "calls per second" in details


class _Cursor:
    def __init__(self, stub: FederationStub, session: bytes) -> None:
        self.stub, self.session = stub, session
        self.attempt, self.index = 0, 0

    def next(self, want: str) -> pb.Instruction:
        for _ in range(100):
            inst = self.stub.Poll(
                pb.PollRequest(
                    session=self.session,
                    attempt=self.attempt,
                    next_index=self.index,
                    wait_ms=1000,
                ),
                timeout=20,
            )
            kind = inst.WhichOneof("kind")
            if kind == "wait":
                continue
            self.attempt, self.index = inst.attempt, inst.index + 1
            assert kind == want, f"expected {want}, got {kind}"
            return inst
        raise AssertionError(f"no {want} instruction arrived")


def test_malformed_oversized_and_out_of_phase_messages_do_not_disturb_the_round(
    federation: Callable[..., Federation],
) -> None:
    real = ["a", "b", "c"]
    fed = federation(
        [*real, "rogue"],
        protocol="secagg+",
        rounds=1,
        aggregation={"threshold": 3},  # n = 4: the complete graph; the sites' minimum is 3
        deadlines={"phase_s": 6.0, "linger_s": 1.0},
        limits={"max_message_bytes": 256 * 1024, "chunk_bytes": 64 * 1024},
    )
    fed.start_server()
    for name in real:
        fed.start_site(name)
    rogue = fed.ids["rogue"]
    raw = {}
    with site_channel(fed, "rogue") as channel:
        stub = FederationStub(channel)
        for method in ("ReportUpdateReady", "SendAdvertiseKeys"):
            raw[method] = channel.unary_unary(SERVICE + method)
        reply = join(stub)
        cursor = _Cursor(stub, reply.session)
        start = cursor.next("round_start")
        r = start.round_id

        # -- update stage --
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.ReportUpdateReady,
            pb.UpdateReady(round_id=r, weight=-1),
        )
        details = expect(grpc.StatusCode.INVALID_ARGUMENT, raw["ReportUpdateReady"], b"\xff" * 9)
        assert "malformed UpdateReady" in details
        advert = pb.AdvertiseKeys(round_id=r, enc_public=b"\x01" * 32, mask_public=b"\x02" * 32)
        expect(grpc.StatusCode.FAILED_PRECONDITION, stub.SendAdvertiseKeys, advert)
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ReportUpdateReady,
            pb.UpdateReady(round_id=r + 5, weight=40),
        )
        stub.ReportUpdateReady(pb.UpdateReady(round_id=r, weight=40.0), timeout=20)
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.ReportUpdateReady,
            pb.UpdateReady(round_id=r, weight=40.0),
        )

        # -- phase 0: advertise keys --
        setup = cursor.next("secagg_setup").secagg_setup
        bad = pb.AdvertiseKeys(round_id=r, enc_public=b"\x01" * 5, mask_public=b"\x02" * 32)
        assert "32 bytes" in expect(grpc.StatusCode.INVALID_ARGUMENT, stub.SendAdvertiseKeys, bad)
        spoof = pb.AdvertiseKeys(
            round_id=r, sender=fed.ids["a"], enc_public=b"\x01" * 32, mask_public=b"\x02" * 32
        )
        assert "certificate" in expect(
            grpc.StatusCode.PERMISSION_DENIED, stub.SendAdvertiseKeys, spoof
        )
        other_round = pb.AdvertiseKeys(
            round_id=r + 7, enc_public=b"\x01" * 32, mask_public=b"\x02" * 32
        )
        expect(grpc.StatusCode.FAILED_PRECONDITION, stub.SendAdvertiseKeys, other_round)
        shares = pb.ShareKeys(
            round_id=r, ciphertexts=[pb.EncryptedShare(peer=1, ciphertext=b"\x00" * 110)]
        )
        assert "phase collect-keys" in expect(
            grpc.StatusCode.FAILED_PRECONDITION, stub.SendShareKeys, shares
        )
        huge = pb.AdvertiseKeys(
            round_id=r,
            enc_public=b"\x01" * 32,
            mask_public=b"\x02" * 32,
            signature=b"\x00" * 300_000,
        )
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.SendAdvertiseKeys, huge)
        header = pb.PayloadHeader(kind=pb.MASKED_INPUT, round_id=r, length=4, bits=32)
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.UploadMaskedInput,
            iter_chunks(header, b"\x00" * 16, 1024),
        )
        plain = pb.PayloadHeader(kind=pb.PLAIN_UPDATE, round_id=r, weight=1.0)
        expect(
            grpc.StatusCode.FAILED_PRECONDITION, stub.UploadUpdate, iter_chunks(plain, b"x", 1024)
        )
        ckks = pb.PayloadHeader(kind=pb.CKKS_CIPHERTEXT, round_id=r)
        expect(grpc.StatusCode.UNIMPLEMENTED, stub.UploadCiphertext, iter_chunks(ckks, b"x", 1024))
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            lambda **kw: list(stub.DownloadModel(pb.ModelRequest(model_sha256=b"\x00" * 32), **kw)),
        )
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.Poll,
            pb.PollRequest(session=b"\x00" * 16, wait_ms=10),
        )

        # Now play the protocol correctly for a while, with the real core.
        config, _ = convert.setup_from_pb(setup, r, max_length=10**6)
        client = SecAggClient(
            rogue,
            config,
            input_vector=np.zeros(config.vector_length, dtype=np.uint32),
            signing_key=load_signing_key(fed.site_dir("rogue") / "signing.key"),
        )
        stub.SendAdvertiseKeys(convert.advert_to_pb(client.start()), timeout=20)
        expect(grpc.StatusCode.FAILED_PRECONDITION, stub.SendAdvertiseKeys, advert)  # duplicate

        # -- phase 1: share keys --
        share_keys = client.handle(convert.roster_from_pb(cursor.next("key_roster").key_roster))
        message = convert.share_keys_to_pb(share_keys)
        short = pb.ShareKeys()
        short.CopyFrom(message)
        short.ciphertexts[0].ciphertext = b"\x00" * 5
        expect(grpc.StatusCode.INVALID_ARGUMENT, stub.SendShareKeys, short)
        missing = pb.ShareKeys()
        missing.CopyFrom(message)
        del missing.ciphertexts[0]
        assert "once to each neighbour" in expect(
            grpc.StatusCode.INVALID_ARGUMENT, stub.SendShareKeys, missing
        )
        stub.SendShareKeys(message, timeout=20)

        # -- phase 2: masked input, every upload broken in another way --
        masked = client.handle(
            convert.delivery_from_pb(cursor.next("share_delivery").share_delivery)
        )
        data = bytes(convert.masked_to_bytes(masked, 32))
        good = pb.PayloadHeader(
            kind=pb.MASKED_INPUT, round_id=r, length=config.vector_length, bits=32
        )
        wrong_length = pb.PayloadHeader(kind=pb.MASKED_INPUT, round_id=r, length=3, bits=32)
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.UploadMaskedInput,
            iter_chunks(wrong_length, data[:12], 1024),
        )
        chunks = list(iter_chunks(good, data, 1024))
        tampered = [*chunks[:-1], pb.Chunk(trailer=pb.PayloadTrailer(sha256=b"\x00" * 32))]
        assert "checksum" in expect(
            grpc.StatusCode.INVALID_ARGUMENT, stub.UploadMaskedInput, iter(tampered)
        )
        assert "trailer" in expect(
            grpc.StatusCode.INVALID_ARGUMENT, stub.UploadMaskedInput, iter(chunks[:-1])
        )
        assert "header" in expect(
            grpc.StatusCode.INVALID_ARGUMENT, stub.UploadMaskedInput, iter(chunks[1:])
        )
        after = [*chunks, pb.Chunk(data=b"\x00")]
        expect(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadMaskedInput, iter(after))
        good.total_bytes = len(data)
        oversized_chunk = [pb.Chunk(header=good), pb.Chunk(data=b"\x00" * (64 * 1024 + 1))]
        details = expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED, stub.UploadMaskedInput, iter(oversized_chunk)
        )
        assert "chunk" in details
        # The rogue vanishes here: a dropout at the masked-input phase.

    codes = fed.wait_all(timeout=90, sites=real)
    assert codes == dict.fromkeys(["server", *real], 0), fed.all_logs()
    record = fed.round_record(0)
    assert record["completed"] and record["dropped"] == [rogue]
    assert record["rejected_calls"] >= 20
    zeros = TaskResult(update=zeros_like_model(fed), weight=40.0)
    expected = fed.simulate(
        1,
        dropouts={0: {rogue: Phase.MASKED_INPUT}},
        extra={0: {rogue: zeros}},
        sites=real,
    )
    assert_matches(fed, expected)
    for name in real:
        assert '"level":"error"' not in fed.log_text(name)
