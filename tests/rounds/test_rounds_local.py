"""The in-process driver over the round halves: exact sums, weighted means, dropouts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rounds_helpers import make_round, site_streams, weighted_mean

from secure_fl.errors import ConfigError, ThresholdError
from secure_fl.rounds import AggregationSpec, plan_round, run_local
from secure_fl.secagg import Phase


@settings(max_examples=15, deadline=None)
@given(
    data=st.data(),
    n=st.integers(min_value=3, max_value=8),
    seed=st.integers(min_value=0, max_value=10**6),
    protocol=st.sampled_from(["secagg", "secagg+"]),
)
def test_weighted_mean_of_the_survivors_within_the_plan_bound(
    data: st.DataObject, n: int, seed: int, protocol: str
) -> None:
    weights = data.draw(
        st.lists(st.floats(0.01, 1e4, allow_nan=False), min_size=n, max_size=n), label="weights"
    )
    r = make_round(
        protocol,
        n,
        30,
        seed=seed,
        weights={i + 1: w for i, w in enumerate(weights)},
        dropout_rate=0.2,
    )
    config = r.plan.secagg
    assert config is not None
    # Any dropouts that leave the threshold (and the consistency quorum) standing.
    spare = min(n - config.threshold, (n - 1) // 2 - 1 if config.active else n)
    gone = data.draw(
        st.lists(st.sampled_from(r.plan.ids), unique=True, max_size=max(0, spare)), label="gone"
    )
    phases = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT]
    dropouts = {s: data.draw(st.sampled_from(phases), label=f"phase {s}") for s in gone}
    out = run_local(r.plan, r.updates, dropouts=dropouts, signing_keys=r.keys)
    assert out.survivors == frozenset(r.plan.ids) - set(dropouts)
    assert out.mean is not None and out.total is not None
    want = weighted_mean(r.updates, dict(r.plan.weights), out.survivors)
    assert np.max(np.abs(out.mean - want)) <= out.record["max_error"]
    bp = r.plan.bit_plan
    assert bp is not None
    assert out.record["max_error"] == bp.mean_error_bound(
        r.plan.surviving_weight(out.survivors), len(out.survivors)
    )


def test_the_modular_sum_is_the_sum_of_the_survivors_encodings() -> None:
    r = make_round("secagg+", 7, 64, seed=3)
    streams = site_streams(3, r.plan.ids)
    out = run_local(
        r.plan,
        r.updates,
        dropouts={4: Phase.MASKED_INPUT},
        signing_keys=r.keys,
        **streams,  # type: ignore[arg-type]
    )
    codec = r.plan.codec
    assert codec is not None and out.total is not None
    want = np.zeros(64, dtype=codec.dtype)
    for s in sorted(out.survivors):
        enc = codec.encode(
            r.updates[s], weight=r.plan.normalised[s], rng=np.random.default_rng([3, s])
        )
        want += enc.values
    assert np.array_equal(out.total, want)
    assert out.dropped == frozenset({4})
    assert out.record["sum_sha256"] and out.record["bytes_sent"][1] > 0


def test_plain_round_is_the_exact_weighted_mean_and_reports_l2_clipping() -> None:
    r = make_round("plain", 4, 10, seed=1, l2_clip=1.0)
    out = run_local(r.plan, r.updates, dropouts={3: Phase.MASKED_INPUT})
    assert out.survivors == frozenset({1, 2, 4})
    clipped = {s: r.updates[s] * min(1.0, 1.0 / np.linalg.norm(r.updates[s])) for s in r.updates}
    want = weighted_mean(clipped, dict(r.plan.weights), out.survivors)
    assert out.mean is not None
    np.testing.assert_allclose(out.mean, want, rtol=1e-12, atol=1e-15)
    assert out.record["clipped_updates"] == [1, 2, 4]  # norms of 10 values in [-1, 1] exceed 1


def test_too_many_dropouts_abort_and_reveal_nothing() -> None:
    r = make_round("secagg", 5, 8, seed=2)
    with pytest.raises(ThresholdError):
        run_local(
            r.plan,
            r.updates,
            dropouts={1: Phase.MASKED_INPUT, 2: Phase.MASKED_INPUT, 3: Phase.MASKED_INPUT},
            signing_keys=r.keys,
        )


def test_updates_must_name_exactly_the_participants() -> None:
    r = make_round("secagg", 3, 4)
    with pytest.raises(ConfigError, match="exactly one vector"):
        run_local(r.plan, {1: r.updates[1]}, signing_keys=r.keys)
    with pytest.raises(ConfigError, match="off the roster"):
        run_local(r.plan, r.updates, dropouts={9: Phase.UNMASKING}, signing_keys=r.keys)


def test_plan_binds_the_weights_the_codec_and_the_extra_binding() -> None:
    spec = AggregationSpec("secagg", active=False)
    base = plan_round(spec, {1: 1.0, 2: 2.0, 3: 3.0}, vector_length=5, round_id=1)
    other = plan_round(spec, {1: 1.0, 2: 2.0, 3: 3.5}, vector_length=5, round_id=1)
    noisy = plan_round(
        spec, {1: 1.0, 2: 2.0, 3: 3.0}, vector_length=5, round_id=1, extra_binding=b'{"z":1}'
    )
    assert base.secagg is not None and other.secagg is not None and noisy.secagg is not None
    assert len({base.secagg.binding, other.secagg.binding, noisy.secagg.binding}) == 3
    assert base.bit_plan is not None
    assert tuple(base.normalised.values()) == base.bit_plan.weights


def test_plan_is_wire_compatible_with_the_grpc_setup_binding() -> None:
    from secure_fl.encoding import plan_bit_width
    from secure_fl.rounds.plan import secagg_config
    from secure_fl.transport import convert

    spec = AggregationSpec("secagg+", active=False, dropout_rate=0.0)
    weights = {s: float(s * 3) for s in range(1, 8)}
    plan = plan_round(spec, weights, vector_length=11, round_id=4)
    bits = plan_bit_width(
        num_sites=len(weights),
        weights=[weights[s] for s in sorted(weights)],
        clip_range=spec.clip_range,
        precision=spec.precision,
        bits=spec.bits,
    )
    config = secagg_config(
        spec,
        sorted(weights),
        vector_length=11,
        bits=bits.bits,
        round_id=4,
        binding=convert.setup_binding(weights, bits.codec(), 11),
    )
    assert plan.secagg == config and plan.secagg.binding == config.binding
