"""A malicious server's setups: SecAggSiteRound refuses them before it sends or derives anything.

Each test lets the honest server half build the setups, changes one field as a lying server
would, and checks that the site half raises (PolicyError for what its policy refuses,
RemoteProtocolError for a malformed or off-roster setup), produced no message, built no protocol
client and drew no randomness (no key, no mask exists for anything to leak from).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from rounds_helpers import make_round

from secure_fl.crypto import DeterministicRandom, SigningKey
from secure_fl.errors import ConfigError, PolicyError, RemoteProtocolError
from secure_fl.rounds import (
    AggregationSpec,
    PlainSetup,
    PlainSiteRound,
    SecAggServerRound,
    SecAggSetup,
    SecAggSiteRound,
    in_process_policy,
    plan_round,
    run_local,
)
from secure_fl.rounds.checks import config_from_setup
from secure_fl.rounds.guards import MemoryReleaseGuard, ReleaseGuard
from secure_fl.transport.config import SitePolicy


class CountingRandom:
    """Randomness that counts every draw (a refused setup must draw none)."""

    def __init__(self) -> None:
        self.calls = 0
        self._inner = DeterministicRandom(b"tests/rounds/adversary")

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        return self._inner(n)


def _setup_and_site(
    protocol: str = "secagg", n: int = 6, **site_kw: Any
) -> tuple[Any, SecAggSetup, SecAggSiteRound, CountingRandom]:
    r = make_round(protocol, n, 16, seed=11, dropout_rate=0.1)
    setups = SecAggServerRound(r.plan).setup()
    rand = CountingRandom()
    policy = site_kw.pop("policy", in_process_policy(r.plan.spec))
    if "roster" not in site_kw:
        site_kw.setdefault("in_process", True)  # the tests' own server: its keys are the roster
    site = SecAggSiteRound(1, policy=policy, signing_key=r.keys[1], randbytes=rand, **site_kw)
    return r, setups[1], site, rand


def _refused(r: Any, site: SecAggSiteRound, rand: CountingRandom, setup: Any, error: type) -> str:
    with pytest.raises(error) as info:
        site.on_setup(setup, update=r.updates[1], reported_weight=r.plan.weights[1])
    assert site.client is None and site.setup_message is None
    assert rand.calls == 0
    return str(info.value)


def test_the_honest_setup_is_accepted() -> None:
    r, setup, site, rand = _setup_and_site()
    advert = site.on_setup(setup, update=r.updates[1], reported_weight=r.plan.weights[1])
    assert advert is not None and advert.sender == 1 and rand.calls > 0


def test_a_wrong_own_weight_is_refused() -> None:
    r, setup, site, rand = _setup_and_site()
    # The server lists this site's weight as something it did not report.
    weights = {**setup.weights, 1: setup.weights[1] * 10}
    message = _refused(r, site, rand, dataclasses.replace(setup, weights=weights), PolicyError)
    assert "it reported" in message
    # Or announces a normalised weight that is not this site's share of the list.
    message = _refused(r, site, rand, dataclasses.replace(setup, weight=0.999), PolicyError)
    assert "share of the listed weights" in message


def test_a_threshold_below_the_site_policy_is_refused() -> None:
    r, setup, site, rand = _setup_and_site("secagg", 6)
    assert setup.threshold > 2
    message = _refused(r, site, rand, dataclasses.replace(setup, threshold=2), PolicyError)
    assert "threshold 2 is below this site's minimum" in message


def test_the_passive_variant_is_refused_unless_the_policy_says_so() -> None:
    r, setup, site, rand = _setup_and_site()
    passive = dataclasses.replace(setup, active=False, verify_keys={})
    message = _refused(r, site, rand, passive, PolicyError)
    assert "semi-honest" in message


def test_a_sparse_degree_below_the_site_choice_is_refused() -> None:
    r, setup, site, rand = _setup_and_site("secagg+", 10)
    assert setup.k > 2
    thin = dataclasses.replace(setup, k=2, threshold=2)
    assert "masking degree k=2" in _refused(r, site, rand, thin, PolicyError)


def test_a_vector_length_other_than_the_model_is_refused() -> None:
    r, setup, site, rand = _setup_and_site()
    longer = dataclasses.replace(setup, vector_length=setup.vector_length + 1)
    assert "vector_length" in _refused(r, site, rand, longer, PolicyError)


def test_sites_or_keys_off_the_roster_are_refused() -> None:
    r0 = make_round("secagg", 6, 16, seed=11)
    roster: dict[int, bytes | None] = {i: k.public_bytes for i, k in r0.keys.items()}
    roster[4] = bytes(32)  # the provisioned key of site 4 differs from the one the server shows
    r, setup, site, rand = _setup_and_site(roster=roster)
    assert "verification key of site 4" in _refused(r, site, rand, setup, RemoteProtocolError)
    r, setup, site, rand = _setup_and_site(roster={i: None for i in range(1, 6)})
    assert "not on the roster" in _refused(r, site, rand, setup, RemoteProtocolError)


def test_a_malformed_setup_or_a_too_long_vector_is_refused() -> None:
    r, setup, site, rand = _setup_and_site(max_vector_length=8)
    assert "limit" in _refused(r, site, rand, setup, RemoteProtocolError)
    r, setup, site, rand = _setup_and_site()
    missing = dataclasses.replace(setup, weights={1: setup.weights[1]})
    assert "one weight per site" in _refused(r, site, rand, missing, RemoteProtocolError)


def test_the_distributed_dp_json_is_bound_into_the_round() -> None:
    _, setup, _, _ = _setup_and_site()
    honest, _ = config_from_setup(setup)
    other, _ = config_from_setup(dataclasses.replace(setup, distributed_dp_json='{"z": 0}'))
    assert honest.binding != other.binding  # sites shown different noise derive unrelated keys


def test_the_l2_clip_is_bound_into_the_round() -> None:
    """A server showing sites different L2 bounds (to make one site's update stand out in the
    sum, or to clip the others away) cannot complete the round: the bound is in the binding."""
    _, setup, _, _ = _setup_and_site()
    honest, _ = config_from_setup(setup)
    clipped, _ = config_from_setup(dataclasses.replace(setup, l2_clip=1.0))
    looser, _ = config_from_setup(dataclasses.replace(setup, l2_clip=1000.0))
    assert len({honest.binding, clipped.binding, looser.binding}) == 3


def test_plain_is_refused_unless_the_policy_allows_it() -> None:
    setup = PlainSetup(1, (1, 2), 3, {1: 1.0, 2: 1.0})
    site = PlainSiteRound(1, policy=SitePolicy())
    with pytest.raises(PolicyError, match="plain"):
        site.on_setup(setup, update=np.zeros(3), reported_weight=1.0)
    assert not site.done


def test_a_plain_setup_with_bad_weights_or_clip_is_refused_naming_the_field() -> None:
    # Attack a8: a decoded (or hand-made) plain setup with inf / negative weights or a negative
    # clip made on_setup raise OverflowError / ZeroDivisionError / ConfigError.
    policy = SitePolicy(aggregations=("plain",), allow_plain=True)
    cases = [
        ({1: 1.0, 2: float("inf")}, None, r"weights\[2\].*finite and > 0"),
        ({1: 1.0, 2: float("nan")}, None, r"weights\[2\].*finite and > 0"),
        ({1: 1.0, 2: -1.0}, None, r"weights\[2\].*finite and > 0"),
        ({1: 1.0, 2: 0.0}, None, r"weights\[2\].*finite and > 0"),
        ({1: 1.0, 2: 1.7e308, 3: 1.7e308}, None, "finite sum"),
        ({1: 1.0, 2: 1.0}, -1.0, "l2_clip must be finite and > 0"),
        ({1: 1.0, 2: 1.0}, float("inf"), "l2_clip must be finite and > 0"),
    ]
    for weights, clip, match in cases:
        setup = PlainSetup(1, tuple(sorted(weights)), 2, weights, clip)
        site = PlainSiteRound(1, policy=policy)
        with pytest.raises(RemoteProtocolError, match=match):
            site.on_setup(setup, update=np.ones(2), reported_weight=1.0)
        assert not site.done


def test_the_active_variant_needs_the_provisioned_roster() -> None:
    # Attack a10: with roster=None every verify key is the server's word: a server that invents
    # the other participants (its own keys, zero updates) decoded the one real site's update.
    spec = make_round("secagg", 5, 32, seed=12, dropout_rate=0.0).plan.spec
    with pytest.raises(ConfigError, match="provisioned roster"):
        SecAggSiteRound(1, policy=in_process_policy(spec), signing_key=SigningKey.generate())
    # A policy that does not require the active variant: an active setup is still refused.
    lax = dataclasses.replace(in_process_policy(spec), require_active=False)
    r, setup, site, rand = _setup_and_site(policy=lax, in_process=False)
    assert setup.active
    assert "provisioned roster" in _refused(r, site, rand, setup, ConfigError)


def test_a_server_inventing_the_other_participants_learns_nothing() -> None:
    ids = [1, 2, 3, 4, 5]
    keys = {i: SigningKey.generate() for i in ids}  # the server made all but site 1's key
    spec = AggregationSpec.from_options("secagg", {"dropout_rate": 0.0})
    weights = {i: 10.0 for i in ids}
    plan = plan_round(
        spec,
        weights,
        vector_length=32,
        round_id=3,
        verify_keys={i: k.public_bytes for i, k in keys.items()},
    )
    x1 = np.random.default_rng(0).uniform(-1, 1, 32)
    updates = {i: (x1 if i == 1 else np.zeros(32)) for i in ids}
    # Site 1's provisioned roster: its real peers' keys, not the server's inventions.
    roster: dict[int, bytes | None] = {i: SigningKey.generate().public_bytes for i in ids}
    roster[1] = keys[1].public_bytes
    victim = SecAggSiteRound(1, policy=in_process_policy(spec), signing_key=keys[1], roster=roster)
    out = run_local(plan, updates, sites={1: victim}, signing_keys=keys)
    assert isinstance(out.record["site_errors"].get(1), RemoteProtocolError)
    assert 1 not in out.survivors and victim.client is None  # nothing derived, nothing sent


def test_a_second_round_under_the_same_id_is_refused_by_the_release_guard() -> None:
    # Attack a11: two rounds under one round id, the second without the target, difference into
    # the target's exact update. A site's guard remembers the ids it took part in.
    r = make_round("secagg", 5, 16, seed=11, dropout_rate=0.0)
    guards = {i: MemoryReleaseGuard() for i in r.plan.ids}
    run_local(r.plan, r.updates, signing_keys=r.keys, release_guards=guards)
    ids2 = [2, 3, 4, 5]
    plan2 = plan_round(
        r.plan.spec,
        {i: r.plan.weights[i] for i in ids2},
        vector_length=16,
        round_id=r.plan.round_id,
        verify_keys={i: r.keys[i].public_bytes for i in ids2},
    )
    with pytest.raises(PolicyError, match="already took part in a round with id"):
        run_local(
            plan2, {i: r.updates[i] for i in ids2}, signing_keys=r.keys, release_guards=guards
        )


def test_a_second_unmasking_with_another_survivor_set_is_refused() -> None:
    r = make_round("secagg", 5, 16, seed=13, dropout_rate=0.0)
    guard = MemoryReleaseGuard()
    # The site already answered an unmasking of this round id for another survivor set (e.g.
    # a restored state, or another round object under the same id).
    guard.claim(r.plan.round_id, frozenset({1, 2, 3}))
    with pytest.raises(PolicyError, match="another survivor set"):
        run_local(r.plan, r.updates, signing_keys=r.keys, release_guards={1: guard})
    same = MemoryReleaseGuard()
    out = run_local(r.plan, r.updates, signing_keys=r.keys, release_guards={1: same})
    same.claim(r.plan.round_id, out.survivors)  # the same set again: allowed
    with pytest.raises(PolicyError, match="another survivor set"):
        same.claim(r.plan.round_id, out.survivors - {5})
    assert isinstance(same, ReleaseGuard)


@pytest.mark.parametrize(
    "floor",
    [{"require_dp": True}, {"min_noise_multiplier": 1.0}, {"max_dp_rounds": 5}],
)
def test_plain_is_refused_when_the_policy_requires_dp(floor: dict[str, Any]) -> None:
    # Attack C9: a site whose policy sets a DP floor sent its update in the clear (no noise,
    # nothing charged) when the server asked for plain and the policy otherwise allowed it.
    policy = SitePolicy(aggregations=("secagg+", "plain"), allow_plain=True, **floor)
    setup = PlainSetup(1, (1, 2), 3, {1: 1.0, 2: 1.0})
    site = PlainSiteRound(1, policy=policy)
    with pytest.raises(PolicyError, match="distributed DP"):
        site.on_setup(setup, update=np.zeros(3), reported_weight=1.0)
    assert not site.done and site.setup_message is None
    # the same policy without the floor sends
    lax = PlainSiteRound(1, policy=SitePolicy(aggregations=("secagg+", "plain"), allow_plain=True))
    assert lax.on_setup(setup, update=np.zeros(3), reported_weight=1.0) is not None
