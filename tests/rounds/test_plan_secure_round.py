"""plan_secure_round: the one planning function of a private round (gRPC server and Flower)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from secure_fl.errors import ConfigError
from secure_fl.rounds.plan import (
    RoundPlan,
    dp_noise_threshold,
    plan_round,
    plan_secure_round,
    round_binding,
)
from secure_fl.rounds.spec import AggregationSpec

WEIGHTS = {i: float(i) for i in range(1, 8)}


def _spec(protocol: str = "secagg", **fields: object) -> AggregationSpec:
    return AggregationSpec(protocol, active=False, **fields)  # type: ignore[arg-type]


def _default(**options: Any) -> RoundPlan:
    """plan_secure_round of the default SecAgg spec over WEIGHTS with ``options``."""
    return plan_secure_round(_spec(), WEIGHTS, vector_length=4, round_id=1, **options)


def test_without_privacy_it_is_plan_round() -> None:
    spec = _spec("secagg+")
    plan = plan_secure_round(spec, WEIGHTS, vector_length=5, round_id=3)
    want = plan_round(spec, WEIGHTS, vector_length=5, round_id=3)
    assert plan == want
    assert plan.secagg is not None and want.secagg is not None
    assert plan.secagg.binding == want.secagg.binding
    assert plan.secagg.threshold == want.secagg.threshold


def test_the_clip_replaces_the_specs_and_the_dp_json_is_bound() -> None:
    spec = _spec(l2_clip=9.0)
    dp_json = json.dumps({"sigma": 1.5})
    plan = plan_secure_round(
        spec, WEIGHTS, vector_length=4, round_id=1, distributed_dp_json=dp_json, l2_clip=2.0
    )
    assert plan.spec.l2_clip == 2.0
    assert plan.extra_binding == dp_json.encode("utf-8")
    assert plan.secagg is not None and plan.codec is not None
    want = round_binding(WEIGHTS, plan.codec, 4, dp_json.encode("utf-8"), 2.0)
    assert plan.secagg.binding == want
    other = plan_secure_round(
        spec, WEIGHTS, vector_length=4, round_id=1, distributed_dp_json=dp_json, l2_clip=3.0
    )
    assert other.secagg is not None and other.secagg.binding != plan.secagg.binding


def test_the_noise_threshold_is_a_floor() -> None:
    spec = _spec()
    base = plan_secure_round(spec, WEIGHTS, vector_length=4, round_id=1)
    assert base.secagg is not None and base.secagg.threshold < 6
    dp5 = json.dumps({"threshold": 5})
    by_json = plan_secure_round(spec, WEIGHTS, vector_length=4, round_id=1, distributed_dp_json=dp5)
    assert by_json.secagg is not None and by_json.secagg.threshold == 5
    by_floor = plan_secure_round(spec, WEIGHTS, vector_length=4, round_id=1, min_threshold=6)
    assert by_floor.secagg is not None and by_floor.secagg.threshold == 6
    both = plan_secure_round(
        spec, WEIGHTS, vector_length=4, round_id=1, distributed_dp_json=dp5, min_threshold=6
    )
    assert both.secagg is not None and both.secagg.threshold == 6
    # A plan already at or above the floor is kept as planned.
    high = plan_secure_round(
        _spec(threshold=7), WEIGHTS, vector_length=4, round_id=1, distributed_dp_json=dp5
    )
    assert high.secagg is not None and high.secagg.threshold == 7


def test_too_few_sites_for_the_floor_are_refused() -> None:
    with pytest.raises(ConfigError, match="cannot reach the noise threshold t=8"):
        _default(min_threshold=8)
    with pytest.raises(ConfigError, match="cannot reach the noise threshold t=8"):
        _default(distributed_dp_json=json.dumps({"threshold": 8}))


def test_a_floor_the_protocol_cannot_plan_is_named() -> None:
    spec = _spec("secagg+", k=2, threshold=2)
    with pytest.raises(ConfigError, match="cannot be planned with the noise threshold t=6"):
        plan_secure_round(spec, WEIGHTS, vector_length=4, round_id=1, min_threshold=6)


def test_unmasked_protocols_ignore_the_floor() -> None:
    plan = plan_secure_round(
        _spec("plain"), {1: 1.0, 2: 1.0}, vector_length=4, round_id=1, min_threshold=5
    )
    assert plan.secagg is None and plan.ids == (1, 2)


@pytest.mark.parametrize("bad", [0, -1, True, 3.0, "3"])
def test_bad_min_threshold_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ConfigError, match="min_threshold"):
        _default(min_threshold=bad)


@pytest.mark.parametrize(
    ("dp_json", "match"),
    [
        (b"{}", "distributed_dp_json must be a str"),
        ("{not json", "distributed_dp_json is not JSON"),
        ('{"threshold": 1}', "threshold must be an integer >= 2"),
        ('{"threshold": true}', "threshold must be an integer >= 2"),
    ],
)
def test_bad_dp_json_is_refused(dp_json: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _default(distributed_dp_json=dp_json)


def test_dp_noise_threshold() -> None:
    assert dp_noise_threshold("") is None
    assert dp_noise_threshold('{"sigma": 1.0}') is None
    assert dp_noise_threshold("[1, 2]") is None
    assert dp_noise_threshold('{"threshold": 4}') == 4


def test_both_servers_plan_with_this_one_function() -> None:
    from secure_fl.transport import server_rounds

    assert vars(server_rounds)["plan_secure_round"] is plan_secure_round
    assert server_rounds.dp_noise_threshold is dp_noise_threshold
    pytest.importorskip("flwr")
    from secure_fl.integrations.flower import _plan, workflow

    assert _plan.plan_secure_round is plan_secure_round
    assert workflow.plan_secure_round is plan_secure_round
