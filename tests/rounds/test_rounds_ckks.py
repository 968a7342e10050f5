"""The CKKS round halves (secure_fl.rounds.ckks) and the server's streaming sum (he.stream)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Mapping

import numpy as np
import pytest

from secure_fl.errors import (
    InvalidUpdateError,
    PolicyError,
    RemoteProtocolError,
    ThresholdError,
)
from secure_fl.he import SecretContext
from secure_fl.he.model import LENGTH, decode_model, max_frame_bytes
from secure_fl.he.stream import TaintedSumError
from secure_fl.rounds.ckks import CkksFrame, CkksServerRound, CkksSiteRound
from secure_fl.rounds.messages import CkksResult, CkksUpload
from secure_fl.rounds.plan import RoundPlan, plan_round
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes
from secure_fl.transport.errors import RejectedError

SLOTS = 4096


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate()


def _plan(weights: Mapping[int, float], size: int, *, chunk: int = 1, rid: int = 7) -> RoundPlan:
    spec = AggregationSpec(protocol="ckks", chunk_ciphertexts=chunk)
    return plan_round(spec, weights, vector_length=size, round_id=rid)


def _vectors(n: int, size: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.uniform(-3, 3, size) for s in range(1, n + 1)}


def _sites(
    secret: SecretContext, server: CkksServerRound, vectors: Mapping[int, np.ndarray]
) -> dict[int, CkksSiteRound]:
    setups = server.setup()
    halves = {}
    for s, vec in vectors.items():
        half = CkksSiteRound(s, secret=secret, expected_fingerprint=secret.fingerprint, stream=True)
        assert half.on_setup(setups[s], update=vec, reported_weight=server.plan.weights[s]) is None
        halves[s] = half
    return halves


def _mean(
    vectors: Mapping[int, np.ndarray], weights: Mapping[int, float], ids: list[int]
) -> np.ndarray:
    total = sum(weights[s] for s in ids)
    return np.asarray(sum(weights[s] * vectors[s] for s in ids) / total)


def test_round_trip_every_site_decrypts_the_weighted_mean(secret: SecretContext) -> None:
    weights = {1: 10.0, 2: 30.0, 3: 60.0}
    vectors = _vectors(3, 2 * SLOTS + 5)
    server = CkksServerRound(_plan(weights, 2 * SLOTS + 5), secret.public())
    halves = _sites(secret, server, vectors)
    for s, half in halves.items():
        server.receive(s, half.upload())
    assert server.expected == frozenset()
    assert server.close() == {} and server.done
    outcome = server.outcome()
    assert outcome.survivors == {1, 2, 3} and outcome.dropped == frozenset()
    assert outcome.encrypted is not None and outcome.mean is None
    model = decode_model(outcome.encrypted)
    assert model.contributors == 3 and model.share == pytest.approx(1.0)
    want = _mean(vectors, weights, [1, 2, 3])
    for half in halves.values():
        half.handle(server.result(outcome))
        assert half.model is not None
        assert np.max(np.abs(half.model["vector"] - want)) < 1e-6


def test_dropout_renormalises_over_the_survivors(secret: SecretContext) -> None:
    weights = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    vectors = _vectors(4, 300, seed=1)
    server = CkksServerRound(_plan(weights, 300), secret.public())
    halves = _sites(secret, server, vectors)
    for s in (1, 3, 4):  # site 2 never uploads
        for frame in halves[s].frames():
            server.receive(s, frame)
    assert server.expected == {2}
    server.close()
    outcome = server.outcome()
    assert outcome.survivors == {1, 3, 4} and outcome.dropped == {2}
    assert outcome.record["ckks_share"] == pytest.approx(8 / 10)
    halves[1].handle(CkksResult(round_id=7, payload=outcome.encrypted or b""))
    assert halves[1].model is not None
    want = _mean(vectors, weights, [1, 3, 4])
    assert np.max(np.abs(halves[1].model["vector"] - want)) < 1e-6


def test_one_survivor_is_refused(secret: SecretContext) -> None:
    server = CkksServerRound(_plan({1: 1.0, 2: 1.0}, 10), secret.public())
    halves = _sites(secret, server, _vectors(2, 10))
    server.receive(1, halves[1].upload())
    with pytest.raises(ThresholdError):
        server.close()


def test_wrong_fingerprint_refused_by_the_site_and_by_the_server(secret: SecretContext) -> None:
    other = SecretContext.generate()
    weights = {1: 1.0, 2: 1.0, 3: 1.0}
    vectors = _vectors(3, 50)
    server = CkksServerRound(_plan(weights, 50), secret.public())
    setups = server.setup()
    # a site of another federation refuses the setup before anything is encrypted
    stranger = CkksSiteRound(1, secret=other)
    with pytest.raises(PolicyError, match="CKKS context"):
        stranger.on_setup(setups[1], update=vectors[1], reported_weight=1.0)
    assert stranger.setup is None
    # ciphertexts under another key are refused by the server, nothing added; the round goes on
    foreign = CkksSiteRound(1, secret=other)
    forged = setups[1].__class__(
        **{**setups[1].__dict__, "context_sha256": bytes.fromhex(other.fingerprint)}
    )
    upload = foreign.on_setup(forged, update=vectors[1], reported_weight=1.0)
    with pytest.raises(RemoteProtocolError, match="context"):
        server.receive(1, upload)
    honest = {}
    for s in (1, 2, 3):
        honest[s] = CkksSiteRound(s, secret=secret)
        upload = honest[s].on_setup(setups[s], update=vectors[s], reported_weight=1.0)
        server.receive(s, upload)  # site 1 may upload again: nothing of its first was added
    server.close()
    outcome = server.outcome()
    honest[2].handle(server.result(outcome))
    assert honest[2].model is not None
    assert np.max(np.abs(honest[2].model["vector"] - _mean(vectors, weights, [1, 2, 3]))) < 1e-6


def test_a_frame_from_another_round_is_refused(secret: SecretContext) -> None:
    weights = {1: 1.0, 2: 1.0, 3: 1.0}
    vectors = _vectors(3, 40)
    server = CkksServerRound(_plan(weights, 40, rid=7), secret.public())
    setups = server.setup()
    # the same site's upload from round 6, relabelled as round 7 in the message
    old = CkksServerRound(_plan(weights, 40, rid=6), secret.public()).setup()
    replay = CkksSiteRound(1, secret=secret, stream=True)
    replay.on_setup(old[1], update=vectors[1], reported_weight=1.0)
    frame = next(replay.frames())
    assert frame.round_id == 6
    with pytest.raises(RemoteProtocolError, match="round 6"):
        server.receive(1, frame)
    relabelled = CkksFrame(round_id=7, sender=1, chunk=0, frame=frame.frame, last=True)
    with pytest.raises(RemoteProtocolError, match="frame of round 6"):
        server.receive(1, relabelled)
    assert server.sum.tainted == frozenset() and server.expected == {1, 2, 3}
    # a message naming another sender is refused too
    with pytest.raises(RemoteProtocolError, match="another sender"):
        server.receive(2, relabelled)
    for s in (2, 3):
        half = CkksSiteRound(s, secret=secret)
        server.receive(s, half.on_setup(setups[s], update=vectors[s], reported_weight=1.0))
    server.close()
    assert server.outcome().survivors == {2, 3}


def test_site_checks_its_own_weight_and_length_before_sending(secret: SecretContext) -> None:
    server = CkksServerRound(_plan({1: 1.0, 2: 3.0}, 20), secret.public())
    setups = server.setup()
    vec = np.ones(20)
    with pytest.raises(PolicyError, match="reported"):
        CkksSiteRound(1, secret=secret).on_setup(setups[1], update=vec, reported_weight=2.0)
    lying = setups[1].__class__(**{**setups[1].__dict__, "weight": 0.9})
    with pytest.raises(PolicyError, match="share"):
        CkksSiteRound(1, secret=secret).on_setup(lying, update=vec, reported_weight=1.0)
    with pytest.raises(PolicyError, match="vector length"):
        CkksSiteRound(1, secret=secret).on_setup(setups[1], update=np.ones(21), reported_weight=1.0)


def test_site_never_refuses_on_its_own_vector_it_clips_it(
    secret: SecretContext, caplog: pytest.LogCaptureFixture
) -> None:
    """(C7) Whether the site's new local model fits the preset depends on its secret update and
    on a base the server chose: a refusal would be a one-bit oracle (base at ``max_abs - t``:
    refused iff the update exceeds ``t``). The site refuses only a base beyond the bound (what
    the server sent) and clips the rest, logging the count locally. Fails before the fix: the
    out-of-range vectors raised PostDecryptionError at setup."""
    bound = secret.preset.max_abs
    weights = {1: 1.0, 2: 1.0}
    server = CkksServerRound(_plan(weights, 8), secret.public())
    setups = server.setup()
    base = np.full(8, 500.0)
    update = np.array([600.0, -600.0, np.nan, np.inf, 100.0, -1.0, 0.0, 5.0])
    halves = {s: CkksSiteRound(s, secret=secret) for s in weights}
    with caplog.at_level("WARNING", logger="secure_fl.rounds.ckks"):
        for s, half in halves.items():
            upload = half.on_setup(setups[s], update=update, reported_weight=1.0, base=base)
            assert isinstance(upload, CkksUpload)
            server.receive(s, upload)
    assert halves[1].clipped == 4  # nan, inf zeroed; 1100 and 600 clipped
    assert "4 value(s)" in caplog.text and "1100" not in caplog.text
    server.close()
    halves[1].handle(server.result(server.outcome()))
    assert halves[1].model is not None
    want = np.array([bound, -100.0, 500.0, 500.0, bound, 499.0, 500.0, 505.0])
    assert np.max(np.abs(halves[1].model["vector"] - want)) < 1e-6
    # without a base: the update itself is clipped
    half = CkksSiteRound(1, secret=secret)
    assert half.on_setup(setups[1], update=np.full(8, 600.0), reported_weight=1.0) is not None
    assert half.clipped == 8
    # a base the server sent beyond the bound (or not finite) is refused, whatever the update
    for bad in (np.full(8, bound + 1.0), np.full(8, np.nan)):
        for upd in (np.zeros(8), np.full(8, -1e9)):
            with pytest.raises(PolicyError, match="the model the server sent"):
                CkksSiteRound(1, secret=secret).on_setup(
                    setups[1], update=upd, reported_weight=1.0, base=bad
                )
    # the in-process simulation (fail_closed=False) still says where and by how much
    with pytest.raises(InvalidUpdateError, match="600"):
        CkksSiteRound(1, secret=secret, fail_closed=False).on_setup(
            setups[1], update=np.full(8, 600.0), reported_weight=1.0
        )


def test_site_refuses_any_other_instruction(secret: SecretContext) -> None:
    half = CkksSiteRound(1, secret=secret)
    with pytest.raises(RemoteProtocolError, match="refused-unknown-instruction"):
        half.handle(CkksUpload(round_id=1, sender=1, payload=b""))
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(half)


def _uploads(secret: SecretContext, server: CkksServerRound, n: int) -> dict[int, bytes]:
    halves = _sites(secret, server, _vectors(n, server.plan.vector_length, seed=3))
    return {s: half.upload().payload for s, half in halves.items()}


def test_a_bad_later_frame_taints_the_sum_a_bad_first_frame_does_not(
    secret: SecretContext,
) -> None:
    weights = {s: 1.0 for s in range(1, 5)}
    server = CkksServerRound(_plan(weights, 3 * SLOTS), secret.public())
    payloads = _uploads(secret, server, 4)
    frames = {s: ckks_wire.unpack_frames(p, 3) for s, p in payloads.items()}
    # site 1: its first frame is corrupted: refused, nothing added
    bad = bytearray(frames[1][0])
    bad[-1] ^= 1
    server.open_upload(1)
    with pytest.raises(RemoteProtocolError, match="nothing added"):
        server.feed(1, LENGTH.pack(len(bad)) + bytes(bad))
    # site 2: frames 0 and 1 are added, then a frame out of order: the sum is tainted
    server.open_upload(2)
    server.feed(2, LENGTH.pack(len(frames[2][0])) + frames[2][0])
    server.feed(2, LENGTH.pack(len(frames[2][1])) + frames[2][1])
    with pytest.raises(TaintedSumError) as info:
        server.feed(2, LENGTH.pack(len(frames[2][1])) + frames[2][1])
    assert info.value.sites == {"2"}
    with pytest.raises(TaintedSumError):
        server.close()


def test_an_upload_cut_after_frames_were_added_taints_the_sum(secret: SecretContext) -> None:
    weights = {s: 1.0 for s in range(1, 4)}
    server = CkksServerRound(_plan(weights, 2 * SLOTS), secret.public())
    payloads = _uploads(secret, server, 3)
    for s in (1, 2):
        server.receive(s, CkksUpload(round_id=7, sender=s, payload=payloads[s]))
    server.open_upload(3)
    server.feed(3, payloads[3][: len(payloads[3]) * 2 // 3])  # one frame and a half
    server.abort_upload(3, "stream cut")
    assert server.sum.tainted == {"3"}
    with pytest.raises(TaintedSumError, match="3"):
        server.close()


def test_an_upload_cut_before_any_frame_is_only_a_dropout(secret: SecretContext) -> None:
    weights = {s: 1.0 for s in range(1, 4)}
    server = CkksServerRound(_plan(weights, 2 * SLOTS), secret.public())
    payloads = _uploads(secret, server, 3)
    server.open_upload(3)
    server.feed(3, payloads[3][:1000])
    for s in (1, 2):
        server.receive(s, CkksUpload(round_id=7, sender=s, payload=payloads[s]))
    server.close()  # site 3 still streaming, nothing of it added: dropped
    assert server.outcome().survivors == {1, 2}


def test_streaming_sum_of_8_uploads_holds_one_frame_per_open_upload(
    secret: SecretContext,
) -> None:
    """8 uploads stream at once, interleaved in 64 KiB pieces: the server never holds more than
    about one frame per open upload besides the running sum (not the 8 uploads)."""
    n, chunks = 8, 6
    weights = {s: float(s) for s in range(1, n + 1)}
    vectors = _vectors(n, chunks * SLOTS, seed=5)
    server = CkksServerRound(_plan(weights, chunks * SLOTS), secret.public())
    halves = _sites(secret, server, vectors)
    payloads = {s: half.upload().payload for s, half in halves.items()}
    total = sum(len(p) for p in payloads.values())
    frame_bound = max_frame_bytes(server.layout, 8192, 1)
    piece = 1 << 16
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for s in payloads:
            server.open_upload(s)
        for offset in range(0, max(len(p) for p in payloads.values()), piece):
            for s, p in payloads.items():
                if offset < len(p):
                    server.feed(s, memoryview(p)[offset : offset + piece])
        for s in payloads:
            server.finish_upload(s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = peak - base
    # counted: the partial-frame buffers never exceeded one frame (plus a piece) per upload
    assert server.sum.peak_buffered <= n * (frame_bound + piece)
    assert server.sum.peak_buffered < total / chunks * 1.5
    # measured (Python allocations; SEAL's ciphertexts are the one model of the running sum):
    # far below buffering the uploads
    assert held < 0.4 * total, (held, total)
    server.close()
    outcome = server.outcome()
    halves[1].handle(server.result(outcome))
    assert halves[1].model is not None
    want = _mean(vectors, weights, list(range(1, n + 1)))
    assert np.max(np.abs(halves[1].model["vector"] - want)) < 1e-6


def test_receive_upload_streams_a_grpc_payload_into_the_round(secret: SecretContext) -> None:
    weights = {1: 1.0, 2: 1.0}
    server = CkksServerRound(_plan(weights, 2 * SLOTS), secret.public())
    payloads = _uploads(secret, server, 2)
    header = pb.PayloadHeader(kind=pb.CKKS_CIPHERTEXT, round_id=7, length=2)
    seen: list[int] = []

    def check(h: pb.PayloadHeader) -> None:
        seen.append(h.total_bytes)

    for s in (1, 2):
        stream = iter_chunk_bytes(header, payloads[s], 50_000)
        got, received = ckks_wire.receive_upload(
            stream, server, s, max_chunk=1 << 20, check_header=check
        )
        assert got.total_bytes == len(payloads[s]) and received > len(payloads[s])
    assert seen == [len(payloads[1]), len(payloads[2])]
    # a second upload of the same site is refused with INVALID_ARGUMENT
    with pytest.raises(RejectedError):
        ckks_wire.receive_upload(
            iter_chunk_bytes(header, payloads[1], 50_000),
            server,
            1,
            max_chunk=1 << 20,
            check_header=check,
        )
    server.close()
    assert server.outcome().survivors == {1, 2}


def test_receive_upload_checksum_mismatch_after_frames_taints(secret: SecretContext) -> None:
    weights = {1: 1.0, 2: 1.0}
    server = CkksServerRound(_plan(weights, 2 * SLOTS), secret.public())
    payloads = _uploads(secret, server, 2)
    header = pb.PayloadHeader(kind=pb.CKKS_CIPHERTEXT, round_id=7, length=2)
    raw = list(iter_chunk_bytes(header, payloads[1], 50_000))
    raw[-1] = pb.Chunk(trailer=pb.PayloadTrailer(sha256=b"\0" * 32)).SerializeToString()
    with pytest.raises(RejectedError, match="checksum"):
        ckks_wire.receive_upload(
            iter(raw), server, 1, max_chunk=1 << 20, check_header=lambda h: None
        )
    assert server.sum.tainted == {"1"}


def test_ckks_messages_round_trip_through_the_codec(secret: SecretContext) -> None:
    from secure_fl.rounds import codec

    server = CkksServerRound(_plan({1: 1.0, 2: 2.0}, 30), secret.public())
    setups = server.setup()
    half = CkksSiteRound(2, secret=secret, stream=True)
    half.on_setup(setups[2], update=np.ones(30), reported_weight=2.0)
    frame = next(half.frames())
    assert frame.last and half.done
    for message in (setups[1], frame, CkksUpload(round_id=7, sender=2, payload=b"xyz")):
        assert codec.decode(codec.encode(message)) == message


def test_generic_run_local_drives_the_ckks_halves(secret: SecretContext) -> None:
    from secure_fl.rounds.local import run_local
    from secure_fl.secagg import Phase

    weights = {1: 2.0, 2: 1.0, 3: 1.0}
    vectors = _vectors(3, 100, seed=9)
    plan = _plan(weights, 100)
    server = CkksServerRound(plan, secret.public())
    sites = {s: CkksSiteRound(s, secret=secret) for s in weights}
    outcome = run_local(plan, vectors, server=server, sites=sites, dropouts={3: Phase.MASKED_INPUT})
    assert outcome.survivors == {1, 2} and outcome.dropped == {3}
    assert outcome.encrypted is not None
    sites[1].handle(CkksResult(round_id=7, payload=outcome.encrypted))
    assert sites[1].model is not None
    want = _mean(vectors, weights, [1, 2])
    assert np.max(np.abs(sites[1].model["vector"] - want)) < 1e-6


def test_an_oversized_frame_length_is_refused_before_buffering(secret: SecretContext) -> None:
    server = CkksServerRound(_plan({1: 1.0, 2: 1.0}, 100), secret.public())
    server.setup()
    server.open_upload(1)
    with pytest.raises(RemoteProtocolError, match="frame length"):
        server.feed(1, LENGTH.pack(2**40) + b"\0" * 100)
    assert server.sum.buffered() == 0 and server.sum.tainted == frozenset()


def test_the_ckks_setup_round_trips_through_its_protobuf_with_every_field(
    secret: SecretContext,
) -> None:
    """ckks_setup_to_pb / ckks_setup_from_pb: the one wire conversion, used by the gRPC server
    and site. Every proto field carries the setup's value (l2_clip, field 8, included), and the
    site half accepts what comes back."""
    from dataclasses import replace

    from secure_fl.rounds.ckks import ckks_setup_from_pb, ckks_setup_to_pb

    spec = AggregationSpec(protocol="ckks", chunk_ciphertexts=2, l2_clip=3.5)
    plan = plan_round(spec, {1: 1.0, 2: 3.0}, vector_length=50, round_id=9)
    server = CkksServerRound(plan, secret.public(), phase_deadline_s=12.5)
    setups = server.setup()
    setup = setups[2]
    wire = ckks_setup_to_pb(setup)
    carried = {f.name for f, _ in wire.ListFields()}  # proto3: the fields not at their default
    assert carried == set(pb.CkksSetup.DESCRIPTOR.fields_by_name), carried
    assert wire.l2_clip == 3.5 and wire.weight == pytest.approx(0.75)
    back = ckks_setup_from_pb(pb.CkksSetup.FromString(wire.SerializeToString()), 9)
    # The proto carries no participants' weights nor extra; everything else comes back.
    assert back == replace(setup, weights={})
    half = CkksSiteRound(2, secret=secret)
    assert half.on_setup(back, update=np.ones(50), reported_weight=3.0) is not None
    # No bound: 0 on the wire, None again at the site.
    none = replace(setup, l2_clip=None)
    assert ckks_setup_to_pb(none).l2_clip == 0.0
    assert ckks_setup_from_pb(ckks_setup_to_pb(none), 9).l2_clip is None


def test_receive_upload_takes_the_round_from_the_checked_header(secret: SecretContext) -> None:
    """The gRPC server knows the round only from the header: receive_upload asks for it (and its
    lock) after the header check, then streams every frame into it; a refused header opens
    nothing."""
    import threading

    weights = {1: 1.0, 2: 1.0}
    server = CkksServerRound(_plan(weights, 2 * SLOTS), secret.public())
    payloads = _uploads(secret, server, 2)
    header = pb.PayloadHeader(kind=pb.CKKS_CIPHERTEXT, round_id=7, length=2)
    lock = threading.Lock()
    asked: list[int] = []

    def round_for(h: pb.PayloadHeader) -> tuple[CkksServerRound, threading.Lock]:
        asked.append(h.round_id)
        return server, lock

    def refuse(h: pb.PayloadHeader) -> None:
        raise RejectedError("FAILED_PRECONDITION", "not now")

    with pytest.raises(RejectedError, match="not now"):
        ckks_wire.receive_upload(
            iter_chunk_bytes(header, payloads[1], 50_000),
            round_for,
            1,
            max_chunk=1 << 20,
            check_header=refuse,
        )
    assert asked == [] and server.sum.open_uploads == ()
    for s in (1, 2):
        ckks_wire.receive_upload(
            iter_chunk_bytes(header, payloads[s], 50_000),
            round_for,
            s,
            max_chunk=1 << 20,
            check_header=lambda h: None,
        )
    assert asked == [7, 7] and not lock.locked()
    server.close()
    assert server.outcome().survivors == {1, 2}


@pytest.mark.parametrize(
    "floor",
    [{"require_dp": True}, {"min_noise_multiplier": 1.0}, {"max_dp_rounds": 5}],
)
def test_site_refuses_ckks_when_its_policy_requires_dp(
    secret: SecretContext, floor: dict[str, object]
) -> None:
    # Attack C9: a site whose policy sets a DP floor took a CKKS round (no distributed noise,
    # nothing charged to its DP budget); it must leave before anything is encrypted or sent.
    from secure_fl.rounds.policy import SitePolicy

    server = CkksServerRound(_plan({1: 1.0, 2: 1.0}, 20), secret.public())
    setups = server.setup()
    half = CkksSiteRound(1, secret=secret, policy=SitePolicy(**floor))  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="distributed DP"):
        half.on_setup(setups[1], update=np.ones(20), reported_weight=1.0)
    assert half.setup is None
    ok = CkksSiteRound(1, secret=secret, policy=SitePolicy())
    assert ok.on_setup(setups[1], update=np.ones(20), reported_weight=1.0) is not None
