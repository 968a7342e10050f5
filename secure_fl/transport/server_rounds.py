"""The server's per-protocol round steps (plain, SecAgg / SecAgg+, CKKS), sans-IO.

Pure functions and small state holders the coordinator (:mod:`.coordinator`) calls: open a round
(plan, protocol config, one setup message per site), close it (decode the sum into the weighted
mean, or add the encrypted uploads). Nothing here touches the network, the disk or the clock; the
driver runs the expensive ones (:func:`secagg_mean`, :func:`ckks_sum`) outside the server's lock.

Guarantees kept from the previous inline code: every site's reported weight and the codec are
bound into every key and signature of a SecAgg round (:func:`convert.setup_binding`); a CKKS
upload is only ever added under encryption, with the public context, each frame only once it was
checked completely.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import Message

from secure_fl.encoding import l2_clip as clip_l2
from secure_fl.errors import LocalProtocolError, RemoteProtocolError
from secure_fl.rounds import protobuf as rounds_pb
from secure_fl.rounds.messages import CkksSetup, SecAggSetup
from secure_fl.rounds.plan import (  # dp_noise_threshold: re-exported from its old place
    dp_noise_threshold as dp_noise_threshold,
)
from secure_fl.rounds.plan import plan_round, plan_secure_round
from secure_fl.rounds.secagg import SecAggServerRound
from secure_fl.secagg import (
    ConsistencyRequest,
    KeyRoster,
    RevealSet,
    SecAggServer,
    ShareDelivery,
    UnmaskRequest,
)
from secure_fl.secagg.messages import ServerMessage
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import convert, rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import ServerConfig


@dataclass
class SecAggRound:
    """The SecAgg part of one attempt: the round layer's server half and the wire setups
    (mutated only under the coordinator's lock)."""

    round: SecAggServerRound
    setups: dict[int, pb.SecAggSetup]
    record: dict[str, Any]

    @property
    def server(self) -> SecAggServer:
        """The protocol core (its phase and expected senders decide what a handler takes)."""
        return self.round.server


@dataclass
class CkksRound:
    """The CKKS part of one attempt: the round layer's server half, whose running sum takes each
    upload frame by frame as it streams in, every frame checked before it is added (bounded
    memory: the sum and one partial frame per upload in flight).

    ``lock`` serialises the sum (the gRPC threads add uploads, the driver closes it) apart from
    the coordinator's lock, so that polls are not blocked while ciphertexts are added;
    ``accepted`` are the sites whose upload is in the sum."""

    round: Any  # secure_fl.rounds.ckks_server.CkksServerRound
    layout: Any  # secure_fl.he.Layout
    factors: dict[int, float]
    setups: dict[int, pb.CkksSetup]
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: set[int] = field(default_factory=set)
    closed: bool = False


def secagg_open(
    config: ServerConfig,
    reported: Mapping[int, float],
    *,
    round_id: int,
    vector_length: int,
    distributed_dp_json: str = "",
    l2_clip: float | None = None,
) -> SecAggRound:
    """Plan a SecAgg / SecAgg+ round over the sites that reported a weight
    (:func:`secure_fl.rounds.plan.plan_secure_round`: the privacy layer's ``l2_clip``, the
    DP JSON bound into the round, the noise's threshold floor;
    :class:`secure_fl.rounds.secagg.SecAggServerRound`).

    The bit plan and every site's normalised weight come from the reported weights; the binding
    (every weight, the codec, the vector length and any distributed-DP configuration) goes into
    every key and signature, so a site shown a different setup aborts the round.
    Errors: ConfigError for a setup the protocol refuses (too few sites for the threshold...)."""
    verify_keys = {
        e.site_id: e.verify_key
        for e in config.roster
        if e.site_id in reported and e.verify_key is not None
    }
    listed = {s: float(reported[s]) for s in sorted(reported)}
    plan = plan_secure_round(
        config.aggregation,
        listed,
        vector_length=vector_length,
        round_id=round_id,
        verify_keys=verify_keys,
        distributed_dp_json=distributed_dp_json,
        l2_clip=l2_clip,  # the privacy layer's bound (it travels in distributed_dp_json)
    )
    phase_s = config.deadlines.phase_s
    server_round = SecAggServerRound(plan, phase_deadline_s=phase_s)
    # The wire setups are the round's own setup messages (one source: l2_clip, DP JSON, weights).
    setups: dict[int, pb.SecAggSetup] = {}
    for site, message in server_round.setup().items():
        if not isinstance(message, SecAggSetup):
            raise TypeError(f"a SecAgg round set up site {site} with {type(message).__name__}")
        setups[site] = rounds_pb.setup_to_pb(message)
    bit_plan = plan.bit_plan
    record = {
        "threshold": server_round.config.threshold,
        "k": server_round.config.degree,
        "bits": bit_plan.bits if bit_plan is not None else None,
        "frac_bits": bit_plan.frac_bits if bit_plan is not None else None,
    }
    return SecAggRound(server_round, setups, record)


def secagg_mean(sa: SecAggRound) -> tuple[np.ndarray, frozenset[int], dict[str, Any]]:
    """The weighted mean of the survivors' updates, the survivors and the record fields.

    Errors: ProtocolError when the round did not complete (the protocol's own checks)."""
    outcome = sa.round.outcome()
    if outcome.mean is None:
        raise LocalProtocolError("the SecAgg round produced no mean")
    keep = ("survivors", "dropped", "excluded", "sum_sha256")
    record = {k: outcome.record[k] for k in keep if k in outcome.record}
    return np.asarray(outcome.mean, dtype=np.float64), frozenset(outcome.survivors), record


def plain_mean(
    config: ServerConfig,
    updates: Mapping[int, tensors.Tensors],
    reported: Mapping[int, float],
    *,
    round_id: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The weighted mean of the plain updates (float64, flat) by the round layer's plain server
    half (:class:`secure_fl.rounds.plain.PlainServerRound`), and its record fields.

    The gRPC plain path learns each weight with its upload, so the round is planned once the
    uploads are closed and the checked uploads are handed to it then.
    Errors: ProtocolError when an upload is refused by the round (NaN, wrong length)."""
    from secure_fl.encoding import flatten
    from secure_fl.rounds.messages import PlainUpload
    from secure_fl.rounds.plain import PlainServerRound

    vectors = {s: np.asarray(flatten(dict(updates[s]))[0], dtype=np.float64) for s in updates}
    length = len(next(iter(vectors.values())))
    weights = {s: float(reported[s]) for s in sorted(updates)}
    plan = plan_round(config.aggregation, weights, vector_length=length, round_id=round_id)
    server_round = PlainServerRound(plan)
    server_round.setup()
    # Plain uploads arrive raw: clip them here exactly as PlainSiteRound does in process.
    bound = plan.spec.l2_clip
    for site in sorted(vectors):
        vec, clipped = vectors[site], False
        if bound is not None:
            vec, info = clip_l2(vec, bound)
            clipped = bool(info.clipped)
        server_round.receive(site, PlainUpload(round_id, site, vec, clipped))
    server_round.close()
    outcome = server_round.outcome()
    if outcome.mean is None:
        raise LocalProtocolError("the plain round produced no mean")
    record = {"survivors": sorted(outcome.survivors), "dropped": []}
    return np.asarray(outcome.mean, dtype=np.float64), record


def ckks_open(
    config: ServerConfig,
    public: Any,
    reported: Mapping[int, float],
    structure: ckks_wire.Structure,
    *,
    round_id: int,
    names: Mapping[int, str],
) -> CkksRound:
    """The CKKS round over the sites that reported a weight
    (:class:`secure_fl.rounds.ckks_server.CkksServerRound`, public context only) and each site's
    setup: the context's fingerprint, the layout and the site's public share of the weight."""
    from secure_fl.rounds.ckks import CkksServerRound, ckks_setup_to_pb

    size = ckks_wire.structure_size(structure)
    weights = {s: float(reported[s]) for s in sorted(reported)}
    plan = plan_round(config.aggregation, weights, vector_length=size, round_id=round_id)
    server_round = CkksServerRound(
        plan,
        public,
        structure=structure,
        names=names,
        min_sites=max(2, config.min_sites),
        phase_deadline_s=config.deadlines.phase_s,
    )
    # The wire setups are the round's own setup messages (one conversion: ckks_setup_to_pb).
    setups: dict[int, pb.CkksSetup] = {}
    for site, setup in server_round.setup().items():
        if not isinstance(setup, CkksSetup):
            raise TypeError(f"a CKKS round set up site {site} with {type(setup).__name__}")
        setups[site] = ckks_setup_to_pb(setup)
    factors = {s: float(plan.normalised[s]) for s in plan.ids}
    return CkksRound(server_round, server_round.layout, factors, setups)


def ckks_add(ck: CkksRound, site: int, payload: bytes | bytearray | memoryview) -> None:
    """Add ``site``'s whole upload (its CKKS_CIPHERTEXT payload) to the running sum (under
    ``ck.lock``) through the round's streaming API, for a caller that holds the whole payload
    (in-process drivers, tests). The gRPC handler streams instead, frame by frame
    (:func:`secure_fl.transport.ckks.receive_upload`), never holding a whole upload.

    Errors: RemoteProtocolError when the stage closed meanwhile or the sum refuses the upload
    (then nothing of it is in the sum)."""
    with ck.lock:
        if ck.closed:
            raise RemoteProtocolError("the upload stage closed before the upload was added")
        rnd = ck.round
        rnd.open_upload(site)
        try:
            rnd.feed(site, payload)
            rnd.finish_upload(site)
        except RemoteProtocolError as exc:
            rnd.abort_upload(site, str(exc))
            raise


def ckks_close(ck: CkksRound) -> tuple[bytes, dict[str, Any]]:
    """Close the uploads: the encrypted weighted sum of the complete ones (a CKKS_MODEL payload,
    the next global model) and the record fields. Nothing is decrypted.

    Errors: ThresholdError for fewer than min_sites complete uploads; TaintedSumError when an
    incomplete upload reached the sum (the round is run again)."""
    with ck.lock:
        ck.closed = True
        ck.round.close()
        outcome = ck.round.outcome()
    if outcome.encrypted is None:
        raise LocalProtocolError("the CKKS round produced no encrypted model")
    blob = bytes(outcome.encrypted)
    record = dict(outcome.record)
    record.update(
        ckks_model_sha256=rounds.sha256(blob).hex(),
        ckks_model_bytes=len(blob),
        ckks_model_encrypted=True,
    )
    return blob, record


def instruction(message: ServerMessage) -> tuple[str, Message]:
    """The Instruction field and protobuf message carrying a SecAgg server message."""
    if isinstance(message, KeyRoster):
        return "key_roster", convert.roster_to_pb(message)
    if isinstance(message, RevealSet):
        return "reveal_set", convert.reveal_set_to_pb(message)
    if isinstance(message, ShareDelivery):
        return "share_delivery", convert.delivery_to_pb(message)
    if isinstance(message, ConsistencyRequest):
        return "consistency_request", convert.consistency_to_pb(message)
    if isinstance(message, UnmaskRequest):
        return "unmask_request", convert.unmask_request_to_pb(message)
    raise TypeError(f"unknown server message {type(message).__name__}")


def pooled_metrics(
    reports: Mapping[str, tuple[Mapping[str, float], int]],
) -> dict[str, dict[str, Any]]:
    """Per metric: every site's value and the pooled value, weighted by the sites' ``samples``
    (an unweighted mean when no site reported a sample count). ``reports``: site name ->
    (metrics, samples)."""
    out: dict[str, dict[str, Any]] = {}
    names = sorted({m for metrics, _ in reports.values() for m in metrics})
    for metric in names:
        sites = {s: (float(m[metric]), n) for s, (m, n) in sorted(reports.items()) if metric in m}
        total = sum(n for _, n in sites.values())
        if total > 0:
            pooled = math.fsum(v * n for v, n in sites.values()) / total
        else:
            pooled = math.fsum(v for v, _ in sites.values()) / len(sites)
        out[metric] = {
            "sites": {s: v for s, (v, _) in sites.items()},
            "samples": {s: n for s, (_, n) in sites.items()},
            "pooled": pooled,
        }
    return out
