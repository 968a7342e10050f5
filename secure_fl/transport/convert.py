"""The gRPC path's protobuf conversions: those of :mod:`secure_fl.rounds.protobuf` (one copy
for every transport; its docstring says what each refuses and with which status), re-exported,
plus the setup helpers in their historical signatures.
"""

from __future__ import annotations

from collections.abc import Mapping

from secure_fl.encoding import FixedPointCodec
from secure_fl.errors import RemoteProtocolError
from secure_fl.rounds import protobuf as _wire
from secure_fl.rounds.checks import config_from_setup
from secure_fl.rounds.messages import SecAggSetup
from secure_fl.rounds.plan import round_binding
from secure_fl.rounds.protobuf import (
    KEY_SIZE,
    MAX_CIPHERTEXT,
    SIGNATURE_SIZE,
    advert_from_pb,
    advert_to_pb,
    consistency_from_pb,
    consistency_to_pb,
    delivery_from_pb,
    delivery_to_pb,
    masked_from_payload,
    masked_to_bytes,
    reveal_from_pb,
    reveal_set_from_pb,
    reveal_set_to_pb,
    reveal_to_pb,
    roster_from_pb,
    roster_to_pb,
    share_keys_from_pb,
    share_keys_to_pb,
    signature_from_pb,
    signature_to_pb,
    unmask_from_pb,
    unmask_request_from_pb,
    unmask_request_to_pb,
    unmask_to_pb,
)
from secure_fl.secagg import SecAggConfig
from secure_fl.transport._generated import federation_pb2 as pb


def setup_to_pb(
    config: SecAggConfig,
    codec: FixedPointCodec,
    weight: float,
    phase_deadline_s: float,
    weights: Mapping[int, float],
    distributed_dp_json: str = "",
    l2_clip: float | None = None,
) -> pb.SecAggSetup:
    """The SecAggSetup a site needs to rebuild ``config`` and encode with ``codec`` and ``weight``
    (its normalised weight); ``weights`` are every participant's reported weight, sent aligned
    with the ascending site ids (``config.binding`` must be :func:`setup_binding` of them, with
    ``distributed_dp_json`` as extra binding when non-empty). ``l2_clip`` reaches the site only
    where the proto has the field (:data:`secure_fl.rounds.protobuf.SETUP_HAS_L2_CLIP`)."""
    ids = sorted(config.site_ids)
    return _wire.setup_to_pb(
        SecAggSetup(
            round_id=config.round_id,
            protocol=config.protocol,
            site_ids=tuple(ids),
            threshold=config.threshold,
            k=config.degree,
            vector_length=config.vector_length,
            bits=config.bits,
            active=config.active,
            frac_bits=codec.frac_bits,
            clip_range=codec.clip_range,
            weight=weight,
            weights={s: float(weights[s]) for s in ids},
            verify_keys=dict(config.verify_keys or {}),
            l2_clip=l2_clip,
            distributed_dp_json=distributed_dp_json,
            phase_deadline_s=phase_deadline_s,
        )
    )


def setup_binding(
    weights: Mapping[int, float], codec: FixedPointCodec, vector_length: int, extra: bytes = b""
) -> bytes:
    """:attr:`SecAggConfig.binding` of a transport round: every participant's reported weight,
    the codec and the vector length (:func:`secure_fl.rounds.plan.round_binding`).
    Errors: ConfigError on a weight that is not finite > 0."""
    return round_binding(weights, codec, vector_length, extra)


def setup_weights(setup: pb.SecAggSetup) -> dict[int, float]:
    """Every participant's listed weight (site id -> reported weight) from a SecAggSetup.
    Errors: RemoteProtocolError unless there is exactly one finite weight > 0 per site id."""
    return dict(_wire.setup_from_pb(setup, 0).weights)


def setup_from_pb(
    setup: pb.SecAggSetup, round_id: int, *, max_length: int
) -> tuple[SecAggConfig, FixedPointCodec]:
    """Rebuild the round's SecAggConfig (bound to every listed weight, the codec and the
    distributed-DP JSON: see :func:`setup_binding`) and codec from a SecAggSetup.

    Errors: RemoteProtocolError when the setup is malformed (including a weights list not aligned
    with the site ids) or its vector is longer than ``max_length`` (the site's own bound on what
    it will allocate).
    """
    if setup.vector_length > max_length:
        raise RemoteProtocolError(
            f"setup asks for vectors of {setup.vector_length} values, the limit is {max_length}"
        )
    return config_from_setup(_wire.setup_from_pb(setup, round_id), max_length=max_length)


__all__ = [
    "KEY_SIZE",
    "MAX_CIPHERTEXT",
    "SIGNATURE_SIZE",
    "advert_from_pb",
    "advert_to_pb",
    "consistency_from_pb",
    "consistency_to_pb",
    "delivery_from_pb",
    "delivery_to_pb",
    "masked_from_payload",
    "masked_to_bytes",
    "reveal_from_pb",
    "reveal_set_from_pb",
    "reveal_set_to_pb",
    "reveal_to_pb",
    "roster_from_pb",
    "roster_to_pb",
    "setup_binding",
    "setup_from_pb",
    "setup_to_pb",
    "setup_weights",
    "share_keys_from_pb",
    "share_keys_to_pb",
    "signature_from_pb",
    "signature_to_pb",
    "unmask_from_pb",
    "unmask_request_from_pb",
    "unmask_request_to_pb",
    "unmask_to_pb",
]
