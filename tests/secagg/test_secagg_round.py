"""End-to-end properties of one SecAgg / SecAgg+ round in the in-process harness."""

from __future__ import annotations

import numpy as np
import pytest
from harness import GraphRecorder, modular_sum, predict, random_inputs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from secure_fl.crypto import DeterministicRandom, SigningKey
from secure_fl.errors import RemoteProtocolError, ThresholdError
from secure_fl.secagg import Phase, make_config, minimum_threshold, run_round

# most sites stay; each may vanish at any phase
PHASES = [None] * 8 + list(Phase)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(min_value=2, max_value=12))
    protocol = draw(st.sampled_from(["secagg", "secagg+"]))
    bits = draw(st.sampled_from([32, 64]))
    length = draw(st.integers(min_value=1, max_value=40))
    if protocol == "secagg+" and n >= 4:
        k = draw(st.sampled_from([k for k in range(2, n - 1, 2)] or [n - 1]))
    else:
        k = n - 1
    holders = k + 1
    active = draw(st.booleans())
    lowest = minimum_threshold(n, k, 0.0, active=active)
    threshold = draw(st.integers(min_value=lowest, max_value=holders))
    drops = draw(st.lists(st.sampled_from(PHASES), min_size=n, max_size=n))
    seed = draw(st.integers(min_value=0, max_value=2**32))
    return n, protocol, bits, length, k, threshold, drops, seed, active


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_sum_is_exact_or_round_aborts(scenario: tuple) -> None:
    n, protocol, bits, length, k, threshold, drops, seed, active = scenario
    rand = DeterministicRandom(seed)
    signing = {i: SigningKey.generate(rand) for i in range(1, n + 1)} if active else None
    config = make_config(
        list(range(1, n + 1)),
        vector_length=length,
        bits=bits,
        protocol=protocol,
        threshold=threshold,
        k=k,
        active=active,
        verify_keys={i: key.public_bytes for i, key in signing.items()} if signing else None,
    )
    inputs = random_inputs(config, seed)
    dropouts = {i + 1: p for i, p in enumerate(drops) if p is not None}
    recorder = GraphRecorder(config)
    try:
        result = run_round(
            config,
            inputs,
            dropouts=dropouts,
            signing_keys=signing,
            randbytes=rand,
            intercept=recorder,
        )
    except (ThresholdError, RemoteProtocolError) as exc:
        event("aborted")
        assert predict(config, dropouts, recorder.graph) is None, exc
        if isinstance(exc, RemoteProtocolError):
            assert "did not reveal" in str(exc)
        return
    event("completed")
    expected = predict(config, dropouts, recorder.graph)
    assert expected is not None and result.survivors == expected
    assert dict(result.graph) == dict(recorder.graph or {})
    np.testing.assert_array_equal(result.total, modular_sum(inputs, expected, bits))
    assert not result.excluded


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_hundred_sites_ten_percent_dropout(protocol: str) -> None:
    n = 100
    rand = DeterministicRandom(f"hundred-{protocol}".encode())
    config = make_config(
        list(range(1, n + 1)),
        vector_length=64,
        bits=32,
        protocol=protocol,
        dropout_rate=0.1,
        corrupt_fraction=0.0,
    )
    inputs = random_inputs(config, 7)
    # ten sites vanish at various phases, four of them after sharing keys (masks to recover)
    phases = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASKING]
    dropouts = {3 + 9 * j: phases[j % 4] for j in range(10)}
    recorder = GraphRecorder(config)
    result = run_round(config, inputs, dropouts=dropouts, randbytes=rand, intercept=recorder)
    expected = predict(config, dropouts, recorder.graph)
    assert expected is not None and result.survivors == expected
    assert len(result.dropped) >= 2  # masks of sites that left after sharing keys were removed
    np.testing.assert_array_equal(result.total, modular_sum(inputs, expected, 32))
    assert not result.client_errors


def test_below_threshold_aborts_and_reveals_nothing() -> None:
    rand = DeterministicRandom(b"below")
    config = make_config(list(range(1, 7)), vector_length=16, bits=32, threshold=4)
    inputs = random_inputs(config, 1)
    dropouts = dict.fromkeys([1, 2, 3], Phase.MASKED_INPUT)
    with pytest.raises(ThresholdError, match="threshold is 4"):
        run_round(config, inputs, dropouts=dropouts, randbytes=rand)


def test_dropout_during_unmasking_still_recovers() -> None:
    rand = DeterministicRandom(b"late")
    config = make_config(list(range(1, 9)), vector_length=32, bits=64, threshold=5)
    inputs = random_inputs(config, 2)
    dropouts = {1: Phase.MASKED_INPUT, 2: Phase.UNMASKING, 3: Phase.UNMASKING}
    result = run_round(config, inputs, dropouts=dropouts, randbytes=rand)
    # sites 2 and 3 sent masked inputs, so they are in the sum even though they left afterwards
    assert result.survivors == frozenset(range(2, 9))
    np.testing.assert_array_equal(result.total, modular_sum(inputs, result.survivors, 64))


def test_party_stats_are_reported() -> None:
    rand = DeterministicRandom(b"stats")
    config = make_config(list(range(1, 6)), vector_length=1000, bits=32)
    result = run_round(config, random_inputs(config, 3), randbytes=rand)
    for stats in result.clients.values():
        assert stats.bytes_sent > 4000  # at least the masked vector itself
        assert stats.seconds > 0
    assert result.server.bytes_sent > 0
