"""The plan of one round: participants and weights -> normalised weights, bit plan, SecAggConfig.

:func:`plan_round` is the one copy of the recipe every driver used to write itself: plan the
fixed-point encoding from the reported weights (:func:`secure_fl.encoding.plan_bit_width`), then
build the SecAggConfig (:func:`secure_fl.secagg.make_config`) whose ``binding`` is
:func:`round_binding` of every participant's reported weight, the codec and the vector length
(plus any ``extra_binding``, e.g. the distributed-DP noise JSON). A site rebuilds the same binding
from the setup it receives (:func:`secure_fl.rounds.secagg.config_from_setup`), so the server
cannot show sites different weights, codecs or noise and still complete the round. With no extra
binding the binding is exactly the gRPC transport's (wire compatible).

:func:`plan_secure_round` is the one copy of how a server plans a private round on top of it
(the privacy layer's L2 clip, the distributed-DP JSON bound into the round, the noise's
threshold floor): the gRPC server (:func:`secure_fl.transport.server_rounds.secagg_open`) and
the Flower workflow (:mod:`secure_fl.integrations.flower.workflow`) both call it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType

from secure_fl import validation as v
from secure_fl.encoding import BitPlan, FixedPointCodec, plan_bit_width
from secure_fl.errors import ConfigError
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.secagg.config import SecAggConfig, encoding_binding, make_config

_EXTRA_DOMAIN = b"secure_fl/rounds/binding-extra/v1\x00"
_L2_DOMAIN = b"secure_fl/rounds/binding-l2-clip/v1\x00"


@dataclass(frozen=True)
class RoundPlan:
    """Everything the server decides before a round starts (public; no secret here).

    ``weights`` every participant's reported weight by site id; ``normalised`` those weights
    normalised exactly as the bit plan does (``w_i / sum(w)`` in exact rationals, rounded once);
    ``bit_plan`` and ``secagg`` for SecAgg / SecAgg+ only; ``extra_binding`` the bytes bound into
    the round beside the weights (the distributed-DP JSON, UTF-8; empty when none).
    """

    spec: AggregationSpec
    round_id: int
    weights: Mapping[int, float]
    vector_length: int
    normalised: Mapping[int, float]
    bit_plan: BitPlan | None = None
    secagg: SecAggConfig | None = field(default=None, repr=False)
    extra_binding: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        object.__setattr__(self, "normalised", MappingProxyType(dict(self.normalised)))

    @property
    def ids(self) -> tuple[int, ...]:
        """The participants' site ids, ascending."""
        return tuple(sorted(self.weights))

    @property
    def codec(self) -> FixedPointCodec | None:
        """The fixed-point codec (SecAgg / SecAgg+), else None."""
        return self.bit_plan.codec() if self.bit_plan is not None else None

    def surviving_weight(self, survivors: frozenset[int] | set[int]) -> float:
        """The sum of the survivors' normalised weights (the divisor of the mean)."""
        return sum(self.normalised[s] for s in sorted(survivors))


def normalise_weights(weights: Mapping[int, float]) -> dict[int, float]:
    """Each weight divided by their sum, in exact rationals rounded once to float: bit-identical
    to :func:`secure_fl.encoding.plan_bit_width`'s ``BitPlan.weights`` and to what a site
    computes for itself (:func:`secure_fl.rounds.checks.own_weight`).

    Errors: ConfigError on an empty mapping, a weight that is not finite > 0, or one whose share
    underflows to 0."""
    if not weights:
        raise ConfigError("weights must name at least one site")
    ids = sorted(weights)
    exact = {s: Fraction(v.positive(f"weights[{s}]", weights[s])) for s in ids}
    total = sum(exact.values(), Fraction(0))
    out = {s: float(exact[s] / total) for s in ids}
    for s, w in out.items():
        if w == 0.0:
            raise ConfigError(
                f"weights[{s}]={weights[s]!r} is so small relative to the total that its "
                "normalised weight underflows to 0; weights must be comparable"
            )
    return out


def round_binding(
    weights: Mapping[int, float],
    codec: FixedPointCodec,
    vector_length: int,
    extra: bytes = b"",
    l2_clip: float | None = None,
) -> bytes:
    """:attr:`SecAggConfig.binding` of a round: :func:`~secure_fl.secagg.config.encoding_binding`
    of every participant's reported weight (ascending ids), the codec and the vector length;
    with ``extra`` (e.g. the distributed-DP JSON), SHA-256 of a domain tag, that digest and a
    digest of ``extra``; with ``l2_clip`` (the bound every site clips its update to), SHA-256 of
    another domain tag, the digest so far and the bound, so that sites shown different bounds
    cannot complete the round together. Without either this is the wire binding of a round
    with no clip and no DP noise, unchanged.

    Errors: ConfigError on a weight that is not finite > 0 or ``extra`` that is not bytes."""
    ids = sorted(weights)
    base = encoding_binding(
        ids,
        [weights[s] for s in ids],
        bits=codec.bits,
        frac_bits=codec.frac_bits,
        clip_range=codec.clip_range,
        vector_length=vector_length,
    )
    if not isinstance(extra, bytes):
        raise ConfigError(f"extra_binding must be bytes, got {type(extra).__name__}")
    bound = base
    if extra:
        digest = hashlib.sha256(extra).digest()
        bound = hashlib.sha256(
            _EXTRA_DOMAIN + base + struct.pack(">Q", len(extra)) + digest
        ).digest()
    if l2_clip is not None:
        bound = hashlib.sha256(_L2_DOMAIN + bound + struct.pack(">d", float(l2_clip))).digest()
    return bound


def secagg_config(
    spec: AggregationSpec,
    site_ids: Sequence[int],
    *,
    vector_length: int,
    bits: int,
    round_id: int,
    verify_keys: Mapping[int, bytes] | None = None,
    binding: bytes = b"",
) -> SecAggConfig:
    """The SecAggConfig of ``spec`` among ``site_ids`` (threshold and degree from the spec, or
    chosen from the number of sites, ``dropout_rate`` and ``corrupt_fraction``; ``verify_keys``
    used by the active variant only; a sparse SecAgg+ graph is derived by the sites in the
    round, never chosen here). Errors: ConfigError."""
    return make_config(
        list(site_ids),
        vector_length=vector_length,
        bits=bits,
        protocol=spec.protocol,
        round_id=round_id,
        threshold=spec.threshold,
        k=spec.k,
        dropout_rate=spec.dropout_rate,
        corrupt_fraction=spec.corrupt_fraction,
        active=spec.active,
        verify_keys=verify_keys if spec.active else None,
        binding=binding,
    )


def plan_round(
    spec: AggregationSpec,
    weights: Mapping[int, float],
    *,
    vector_length: int,
    round_id: int,
    verify_keys: Mapping[int, bytes] | None = None,
    extra_binding: bytes = b"",
) -> RoundPlan:
    """Plan round ``round_id`` among the sites of ``weights`` (site id -> reported weight).

    SecAgg / SecAgg+: the bit plan from the weights in ascending id order, and the SecAggConfig
    (threshold and degree from ``spec`` or chosen from the number of sites, ``dropout_rate`` and
    ``corrupt_fraction``) bound to :func:`round_binding`. ``verify_keys`` (site id -> Ed25519
    public key) are required by the active variant and ignored by the semi-honest one.

    Errors: ConfigError on invalid weights (not finite > 0, an id outside [1, 2**32)), a vector
    length < 1, a bit plan that cannot hold the sum, protocol parameters out of range (fewer than
    2 sites for SecAgg), or the active variant without one key per site.
    """
    if not isinstance(spec, AggregationSpec):
        raise ConfigError(f"spec must be an AggregationSpec, got {type(spec).__name__}")
    length = v.integer("vector_length", vector_length, low=1)
    rid = v.integer("round_id", round_id, low=0, high=2**63 - 1)
    listed: dict[int, float] = {}
    for site, w in weights.items():
        sid = v.integer("site id", site, low=1, high=2**32 - 1)
        listed[sid] = v.positive(f"weights[{sid}]", w)
    normalised = normalise_weights(listed)
    if not spec.masked:
        return RoundPlan(spec, rid, listed, length, normalised, extra_binding=extra_binding)
    ids = sorted(listed)
    bit_plan = plan_bit_width(
        num_sites=len(ids),
        weights=[listed[s] for s in ids],
        clip_range=spec.clip_range,
        precision=spec.precision,
        bits=spec.bits,
    )
    config = secagg_config(
        spec,
        ids,
        vector_length=length,
        bits=bit_plan.bits,
        round_id=rid,
        verify_keys=verify_keys,
        binding=round_binding(listed, bit_plan.codec(), length, extra_binding, spec.l2_clip),
    )
    return RoundPlan(
        spec,
        rid,
        listed,
        length,
        dict(zip(ids, bit_plan.weights, strict=True)),
        bit_plan,
        config,
        extra_binding,
    )


def dp_noise_threshold(distributed_dp_json: str) -> int | None:
    """The SecAgg threshold a distributed-DP noise configuration (``distributed_dp_json``, as
    :meth:`ServerPrivacy.before_round` gives it) was sized for, or None (no DP, central
    trust's clip, or no ``threshold`` field). Errors: ConfigError when the JSON is malformed
    or its threshold is not an integer >= 2."""
    if not distributed_dp_json:
        return None
    try:
        fields = json.loads(distributed_dp_json)
    except ValueError as exc:
        raise ConfigError(f"distributed_dp_json is not JSON: {exc}") from exc
    value = fields.get("threshold") if isinstance(fields, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"distributed_dp_json threshold must be an integer >= 2, got {value!r}")
    return value


def plan_secure_round(
    spec: AggregationSpec,
    weights: Mapping[int, float],
    *,
    vector_length: int,
    round_id: int,
    verify_keys: Mapping[int, bytes] | None = None,
    distributed_dp_json: str = "",
    l2_clip: float | None = None,
    min_threshold: int | None = None,
) -> RoundPlan:
    """:func:`plan_round` of a private round, as every server plans one (pure).

    ``l2_clip`` (the privacy layer's bound, when given) replaces the spec's and is bound into
    the round; ``distributed_dp_json`` (UTF-8) is bound into the round as ``extra_binding``. A
    SecAgg / SecAgg+ plan whose threshold is below the noise's floor (the larger of
    :func:`dp_noise_threshold` of the JSON and ``min_threshold``: the noise is sized for it and
    every site refuses a lower one) is planned again with that threshold; a plan at or above
    it, or of another protocol, is returned as planned.

    Errors: ConfigError on ``distributed_dp_json`` that is not a string or malformed JSON,
    ``min_threshold`` that is not None or an integer >= 1, fewer sites than the floor
    ("cannot reach the noise threshold"), a plan the floor makes impossible (named with the
    floor), and everything :func:`plan_round` refuses."""
    if not isinstance(distributed_dp_json, str):
        raise ConfigError(
            f"distributed_dp_json must be a str, got {type(distributed_dp_json).__name__}"
        )
    if min_threshold is not None:
        min_threshold = v.integer("min_threshold", min_threshold, low=1)
    if l2_clip is not None:
        spec = dataclasses.replace(spec, l2_clip=l2_clip)
    extra = distributed_dp_json.encode("utf-8")
    plan = plan_round(
        spec,
        weights,
        vector_length=vector_length,
        round_id=round_id,
        verify_keys=verify_keys,
        extra_binding=extra,
    )
    floors = [t for t in (dp_noise_threshold(distributed_dp_json), min_threshold) if t]
    noise_t = max(floors) if floors else None
    if noise_t is None or plan.secagg is None or plan.secagg.threshold >= noise_t:
        return plan
    # The noise is sized for noise_t honest-share holders (the whole roster's threshold);
    # every site refuses a plan below it (CodecNoiseConfig.check_plan): plan with it.
    if len(weights) < noise_t:
        raise ConfigError(
            f"a distributed-DP round of {len(weights)} sites cannot reach the noise threshold "
            f"t={noise_t} (sized for the roster); the round is not started"
        )
    try:
        return plan_round(
            dataclasses.replace(spec, threshold=noise_t),
            weights,
            vector_length=vector_length,
            round_id=round_id,
            verify_keys=verify_keys,
            extra_binding=extra,
        )
    except ConfigError as exc:
        raise ConfigError(
            f"a distributed-DP round of {len(weights)} sites cannot be planned with the "
            f"noise threshold t={noise_t} (sized for the roster): {exc}"
        ) from exc


__all__ = [
    "RoundPlan",
    "dp_noise_threshold",
    "normalise_weights",
    "plan_round",
    "plan_secure_round",
    "round_binding",
    "secagg_config",
]
