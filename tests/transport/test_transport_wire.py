"""Chunked payloads, the tensors format and the protocol-message conversions, without a network."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from secure_fl.encoding import FixedPointCodec, plan_bit_width
from secure_fl.errors import InvalidUpdateError, PolicyError, RemoteProtocolError
from secure_fl.secagg import (
    ConsistencyRequest,
    KeyRoster,
    MaskedInput,
    RevealNonce,
    RevealSet,
    ShareDelivery,
    SitePolicy,
    UnmaskRequest,
    UnmaskResponse,
    make_config,
    run_round,
)
from secure_fl.secagg.client import SecAggClient
from secure_fl.transport import convert, rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import PayloadReceiver, iter_chunks, receive, receive_raw
from secure_fl.transport.errors import RejectedError


def accept(header: pb.PayloadHeader) -> None:
    if header.kind != pb.MASKED_INPUT:
        raise RejectedError("INVALID_ARGUMENT", "wrong kind")


def test_chunks_round_trip_with_bounded_pieces() -> None:
    data = bytes(range(256)) * 41
    header = pb.PayloadHeader(kind=pb.MASKED_INPUT, round_id=3, length=7)
    chunks = list(iter_chunks(header, data, 1000))
    assert chunks[0].header.total_bytes == len(data)
    assert all(len(c.data) <= 1000 for c in chunks[1:-1])
    assert chunks[-1].trailer.sha256 == hashlib.sha256(data).digest()
    got_header, got = receive(chunks, max_chunk=1000, max_total=len(data), check_header=accept)
    assert bytes(got) == data and got_header.round_id == 3
    raw = [c.SerializeToString() for c in chunks]
    _, got, nbytes = receive_raw(raw, max_chunk=1000, max_total=len(data), check_header=accept)
    assert bytes(got) == data and nbytes == sum(map(len, raw))


def test_empty_payload() -> None:
    chunks = list(iter_chunks(pb.PayloadHeader(kind=pb.MASKED_INPUT), b"", 10))
    assert len(chunks) == 2
    _, got = receive(chunks, max_chunk=10, max_total=10, check_header=accept)
    assert got == bytearray()


@pytest.mark.parametrize(
    ("mutate", "code", "words"),
    [
        (lambda c: c[1:], "INVALID_ARGUMENT", "start with a header"),
        (lambda c: c[:-1], "INVALID_ARGUMENT", "before its trailer"),
        (
            lambda c: [*c[:-1], pb.Chunk(trailer=pb.PayloadTrailer(sha256=b"x" * 32))],
            "INVALID_ARGUMENT",
            "checksum",
        ),
        (lambda c: [c[0], *c[2:]], "INVALID_ARGUMENT", "truncated"),
        (lambda c: [*c, pb.Chunk(data=b"1")], "INVALID_ARGUMENT", "after the payload trailer"),
        (lambda c: [c[0], c[0], *c[1:]], "INVALID_ARGUMENT", "second payload header"),
        (lambda c: [c[0], pb.Chunk()], "INVALID_ARGUMENT", "empty chunk"),
        (
            lambda c: [c[0], pb.Chunk(data=b"z" * 101), *c[1:]],
            "RESOURCE_EXHAUSTED",
            "exceeds the limit",
        ),
        (lambda c: [c[0], pb.Chunk(data=b"z" * 100), *c[1:]], "INVALID_ARGUMENT", "longer than"),
    ],
)
def test_broken_streams_are_refused(mutate, code: str, words: str) -> None:
    chunks = list(iter_chunks(pb.PayloadHeader(kind=pb.MASKED_INPUT), b"a" * 250, 100))
    with pytest.raises(RejectedError) as info:
        receive(mutate(chunks), max_chunk=100, max_total=10_000, check_header=accept)
    assert info.value.code == code and words in info.value.message


def test_declared_size_and_header_check_come_before_any_data() -> None:
    big = pb.Chunk(header=pb.PayloadHeader(kind=pb.MASKED_INPUT, total_bytes=10**12))
    receiver = PayloadReceiver(max_chunk=10, max_total=1000, check_header=accept)
    with pytest.raises(RejectedError, match="exceeds the limit") as info:
        receiver.feed(big)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    receiver = PayloadReceiver(max_chunk=10, max_total=1000, check_header=accept)
    with pytest.raises(RejectedError, match="wrong kind"):
        receiver.feed(pb.Chunk(header=pb.PayloadHeader(kind=pb.MODEL)))
    with pytest.raises(RejectedError, match="not a valid Chunk"):
        PayloadReceiver(max_chunk=10, max_total=10, check_header=accept).feed_raw(b"\xff" * 5)


def test_rejected_error_names_a_real_status() -> None:
    with pytest.raises(ValueError):
        RejectedError("NOT_A_CODE", "x")
    assert str(RejectedError("INVALID_ARGUMENT", "bad")) == "INVALID_ARGUMENT: bad"


def test_tensors_round_trip_and_refuse_malformed_input() -> None:
    model = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.0], dtype=np.float64),
        "s": np.zeros((0, 2), dtype=np.float16),
    }
    blob = tensors.dumps(model)
    back = tensors.loads(blob)
    assert list(back) == ["w", "b", "s"]
    for k in model:
        assert back[k].dtype == model[k].dtype and np.array_equal(back[k], model[k])
        assert back[k].flags.writeable
    assert tensors.same_structure(back, model)
    for bad in (b"", b"XXXXXXXX" + blob[8:], blob[:-1], blob + b"\x00", blob[:20]):
        with pytest.raises(InvalidUpdateError):
            tensors.loads(bad)
    with pytest.raises(InvalidUpdateError, match="dtype"):
        tensors.dumps({"i": np.zeros(3, dtype=np.int64)})
    header = b'{"tensors":[{"name":"x","dtype":"object","shape":[1],"offset":0,"nbytes":8}]}'
    forged = tensors.MAGIC + len(header).to_bytes(8, "little") + header + b"\x00" * 8
    with pytest.raises(InvalidUpdateError, match="dtype"):
        tensors.loads(forged)


def _round_messages():
    """Real protocol messages from an in-process sparse SecAgg+ round of 7 sites (k = 2, so
    adverts carry graph commitments and a reveal phase runs)."""
    config = make_config(
        list(range(1, 8)), vector_length=5, bits=32, protocol="secagg+", k=2, threshold=2
    )
    policy = SitePolicy(require_active=False)  # the semi-honest variant, by name
    clients = {
        s: SecAggClient(s, config, policy=policy, input_vector=np.full(5, s, dtype=np.uint32))
        for s in config.site_ids
    }
    adverts = {s: c.start() for s, c in clients.items()}
    return config, clients, adverts


def _wire(message, cls):  # any protobuf message and its class
    return cls.FromString(message.SerializeToString())


def test_protocol_messages_survive_the_wire() -> None:
    _, clients, adverts = _round_messages()
    for s, advert in adverts.items():
        assert len(advert.graph_commitment) == 32
        wire = _wire(convert.advert_to_pb(advert), pb.AdvertiseKeys)
        assert convert.advert_from_pb(wire, s) == advert
    roster = KeyRoster(0, tuple(adverts[s] for s in sorted(adverts)))
    wire_roster = _wire(convert.roster_to_pb(roster), pb.KeyRoster)
    assert convert.roster_from_pb(wire_roster) == roster
    reveals = {s: c.handle(roster) for s, c in clients.items()}
    for s, reveal in reveals.items():
        assert isinstance(reveal, RevealNonce)
        assert convert.reveal_from_pb(_wire(convert.reveal_to_pb(reveal), pb.RevealNonce), s) == (
            reveal
        )
    reveal_set = RevealSet(0, tuple((s, r.nonce) for s, r in sorted(reveals.items())))
    assert convert.reveal_set_from_pb(
        _wire(convert.reveal_set_to_pb(reveal_set), pb.RevealSet)
    ) == (reveal_set)
    share = clients[1].handle(reveal_set)
    assert share.commitments
    back = convert.share_keys_from_pb(
        _wire(convert.share_keys_to_pb(share), pb.ShareKeys), 1, max_entries=6
    )
    assert back == share
    delivery = ShareDelivery(
        0,
        ((2, b"c" * 110), (3, b"d" * 110)),
        ((2, b"m" * 32, b"s" * 32), (3, b"n" * 32, b"t" * 32)),
    )
    assert convert.delivery_from_pb(_wire(convert.delivery_to_pb(delivery), pb.ShareDelivery)) == (
        delivery
    )
    response = UnmaskResponse(
        0, 2, ((1, b"a" * 37, b"x" * 32),), ((3, b"b" * 37, b"y" * 32),), rejected=(4,)
    )
    wire_response = _wire(convert.unmask_to_pb(response), pb.UnmaskResponse)
    assert convert.unmask_from_pb(wire_response, 2, max_entries=8) == response
    request = ConsistencyRequest(0, frozenset({1, 2, 3}))
    assert convert.consistency_from_pb(convert.consistency_to_pb(request)) == request
    unmask = UnmaskRequest(0, frozenset({1, 2}), frozenset({3}), ((1, b"s" * 64),))
    assert convert.unmask_request_from_pb(convert.unmask_request_to_pb(unmask)) == unmask
    masked = MaskedInput(0, 2, np.array([1, 2**32 - 1, 7], dtype=np.uint32))
    data = bytes(convert.masked_to_bytes(masked, 32))
    header = pb.PayloadHeader(round_id=0, length=3, bits=32)
    got = convert.masked_from_payload(header, bytearray(data), 2)
    assert np.array_equal(got.vector, masked.vector) and got.vector.dtype == np.uint32


def test_site_to_server_messages_are_checked_before_the_core_sees_them() -> None:
    ok = pb.AdvertiseKeys(round_id=0, enc_public=b"a" * 32, mask_public=b"b" * 32)
    assert convert.advert_from_pb(ok, 5).sender == 5  # the sender comes from the certificate
    for bad, code in [
        (
            pb.AdvertiseKeys(round_id=0, sender=4, enc_public=b"a" * 32, mask_public=b"b" * 32),
            "PERMISSION_DENIED",
        ),
        (
            pb.AdvertiseKeys(round_id=0, enc_public=b"a" * 31, mask_public=b"b" * 32),
            "INVALID_ARGUMENT",
        ),
        (
            pb.AdvertiseKeys(
                round_id=0, enc_public=b"a" * 32, mask_public=b"b" * 32, signature=b"s"
            ),
            "INVALID_ARGUMENT",
        ),
    ]:
        with pytest.raises(RejectedError) as info:
            convert.advert_from_pb(bad, 5)
        assert info.value.code == code
    many = pb.ShareKeys(
        ciphertexts=[pb.EncryptedShare(peer=i, ciphertext=b"x" * 100) for i in range(5)]
    )
    with pytest.raises(RejectedError, match="at most 4"):
        convert.share_keys_from_pb(many, 1, max_entries=4)
    with pytest.raises(RejectedError, match="37 bytes"):
        convert.unmask_from_pb(
            pb.UnmaskResponse(self_mask_shares=[pb.OwnedShare(owner=1, share=b"x")]), 1, 8
        )
    with pytest.raises(RejectedError, match="salts must be 32 bytes"):
        convert.unmask_from_pb(
            pb.UnmaskResponse(
                self_mask_shares=[pb.OwnedShare(owner=1, share=b"x" * 37, salt=b"s")]
            ),
            1,
            8,
        )
    with pytest.raises(RejectedError, match="graph_commitment"):
        convert.advert_from_pb(
            pb.AdvertiseKeys(
                enc_public=b"a" * 32, mask_public=b"b" * 32, graph_commitment=b"c" * 31
            ),
            5,
        )
    with pytest.raises(RejectedError, match="nonce must be 32 bytes"):
        convert.reveal_from_pb(pb.RevealNonce(nonce=b"n" * 31), 5)
    with pytest.raises(RejectedError, match="certificate"):
        convert.reveal_from_pb(pb.RevealNonce(sender=4, nonce=b"n" * 32), 5)
    with pytest.raises(RejectedError, match="commitments must be 32 bytes"):
        convert.share_keys_from_pb(
            pb.ShareKeys(commitments=[pb.ShareCommitment(site=1, mask_key_commitment=b"m")]),
            1,
            max_entries=4,
        )
    with pytest.raises(RejectedError, match="64 bytes"):
        convert.signature_from_pb(pb.ConsistencySignature(signature=b"x"), 1)


def test_server_to_site_messages_refuse_duplicates() -> None:
    with pytest.raises(RemoteProtocolError, match="twice"):
        convert.unmask_request_from_pb(pb.UnmaskRequest(survivors=[1, 1], dropped=[]))
    twice = pb.RevealSet(reveals=[pb.SiteNonce(site=1, nonce=b"a"), pb.SiteNonce(site=1)])
    with pytest.raises(RemoteProtocolError, match="twice"):
        convert.reveal_set_from_pb(twice)
    setup = pb.SecAggSetup(protocol="secagg", site_ids=[1, 1, 2], k=1, threshold=2)
    with pytest.raises(RemoteProtocolError, match="twice"):
        convert.setup_from_pb(setup, 0, max_length=10)


def test_round_configuration_travels_exactly() -> None:
    config = make_config(
        list(range(1, 8)), vector_length=9, bits=64, protocol="secagg+", k=2, threshold=2
    )
    codec = FixedPointCodec(bits=64, frac_bits=30, clip_range=3.5)
    weights = {s: float(s) for s in range(1, 8)}
    config = dataclasses.replace(config, binding=convert.setup_binding(weights, codec, 9))
    setup = pb.SecAggSetup.FromString(
        convert.setup_to_pb(config, codec, 0.125, 9.0, weights).SerializeToString()
    )
    back, back_codec = convert.setup_from_pb(setup, 0, max_length=100)
    # No graph travels: only the degree; the sites derive a sparse graph themselves.
    assert back == config and back.k == 2 and back.sparse
    assert convert.setup_weights(setup) == weights
    assert "graph" not in {f.name for f in pb.SecAggSetup.DESCRIPTOR.fields}
    assert back_codec == codec and setup.weight == 0.125
    with pytest.raises(RemoteProtocolError, match="limit"):
        convert.setup_from_pb(setup, 0, max_length=8)
    setup.threshold = 99
    with pytest.raises(RemoteProtocolError, match="threshold"):
        convert.setup_from_pb(setup, 0, max_length=100)


def test_simulation_harness_still_sums() -> None:
    config = make_config([1, 2, 3], vector_length=4, bits=32, threshold=2)
    inputs = {s: np.full(4, s, dtype=np.uint32) for s in config.site_ids}
    assert np.array_equal(run_round(config, inputs).total, np.full(4, 6, dtype=np.uint32))


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 70_000])
def test_preserialised_chunks_equal_protobuf_serialisation(size: int) -> None:
    from secure_fl.transport.chunks import iter_chunk_bytes

    data = bytes(i % 251 for i in range(size))
    header = pb.PayloadHeader(kind=pb.MODEL, round_id=2, length=1)
    fast = list(iter_chunk_bytes(header, data, 30_000))
    slow = [c.SerializeToString() for c in iter_chunks(header, data, 30_000)]
    assert fast == slow
    receiver = PayloadReceiver(max_chunk=30_000, max_total=10**6, check_header=lambda h: None)
    for raw in fast:
        receiver.feed_raw(raw)
    assert bytes(receiver.result()[1]) == data


def test_fast_path_falls_back_to_protobuf_for_anything_unusual() -> None:
    # A data field followed by a trailer in one message: protobuf keeps the last oneof member.
    odd = (
        pb.Chunk(data=b"abc").SerializeToString()
        + pb.Chunk(
            trailer=pb.PayloadTrailer(sha256=hashlib.sha256(b"").digest())
        ).SerializeToString()
    )
    receiver = PayloadReceiver(max_chunk=10, max_total=10, check_header=lambda h: None)
    receiver.feed(pb.Chunk(header=pb.PayloadHeader(kind=pb.MODEL)))
    receiver.feed_raw(odd)
    assert receiver.result()[1] == bytearray()


def test_setup_weights_must_align_with_the_sites_and_bind_the_round() -> None:
    config = make_config([1, 2, 3], vector_length=4, bits=32, threshold=2)
    codec = FixedPointCodec(bits=32, frac_bits=16, clip_range=1.0)
    weights = {1: 10.0, 2: 20.0, 3: 30.0}
    setup = convert.setup_to_pb(config, codec, 1 / 6, 9.0, weights)
    bound, _ = convert.setup_from_pb(setup, 0, max_length=10)
    assert bound.binding == convert.setup_binding(weights, codec, 4)
    # Any other weight list or codec is another round context.
    for other in ({**weights, 3: 31.0}, {1: 10.0, 2: 20.0}):
        assert convert.setup_binding(other, codec, 4) != bound.binding
    assert convert.setup_binding(weights, FixedPointCodec(32, 15, 1.0), 4) != bound.binding
    assert convert.setup_binding(weights, FixedPointCodec(32, 16, 0.5), 4) != bound.binding
    del setup.weights[-1]
    with pytest.raises(RemoteProtocolError, match="2 weights for 3 sites"):
        convert.setup_from_pb(setup, 0, max_length=10)
    setup.weights.append(float("nan"))
    with pytest.raises(RemoteProtocolError, match="finite and > 0"):
        convert.setup_from_pb(setup, 0, max_length=10)


def test_a_site_computes_its_own_weight_from_the_listed_weights() -> None:
    listed = {1: 10.0, 2: 20.0, 3: 30.0}
    plan = plan_bit_width(
        num_sites=3, weights=[10.0, 20.0, 30.0], clip_range=1.0, precision=1e-4, bits=64
    )
    for site, expected in zip(sorted(listed), plan.weights, strict=True):
        # Bit-identical to the server's plan (the in-process and gRPC sums stay equal).
        assert rounds.own_weight(listed, site, listed[site], expected) == expected
    with pytest.raises(PolicyError, match="it reported"):
        rounds.own_weight(listed, 1, 11.0, plan.weights[0])
    with pytest.raises(PolicyError, match="share of the listed weights"):
        rounds.own_weight(listed, 1, 10.0, 1.0)
    with pytest.raises(PolicyError, match="no weight"):
        rounds.own_weight(listed, 4, 10.0, 0.1)
