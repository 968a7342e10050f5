"""A site's own policy and its contribution record, without a network (the refusals over real
gRPC are in tests/adversary/test_grpc.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.transport import policy
from secure_fl.transport.config import (
    SitePolicy,
    load_server_config,
    load_site_config,
    policy_to_json,
)
from secure_fl.transport.provision import provision
from secure_fl.transport.replay import ContributionGuard


def _site_json(tmp_path: Path, **kwargs: object) -> Path:
    done = provision(tmp_path / "fed", ["a", "b", "c"], ckks=False, **kwargs)  # type: ignore[arg-type]
    return done.site_configs["a"]


def test_provision_pins_the_policy_in_every_site_config(tmp_path: Path) -> None:
    path = _site_json(tmp_path, protocol="secagg", corrupt_fraction=0.2, model_shapes=[[4, 5]])
    site = load_site_config(path)
    assert site.policy == SitePolicy(
        aggregations=("secagg",),
        allow_plain=False,
        require_active=True,
        corrupt_fraction=0.2,
        dropout_rate=0.1,
        vector_length=20,
    )
    server = load_server_config(path.parents[2] / "server" / "server.json")
    assert server.aggregation.active and server.aggregation.corrupt_fraction == 0.2
    assert server.model.shapes == ((4, 5),)


def test_provision_semi_honest_and_plain_only_by_name(tmp_path: Path) -> None:
    site = load_site_config(_site_json(tmp_path / "x", protocol="plain", active=False))
    assert site.policy.accepts("plain") and not site.policy.require_active
    assert not load_server_config(
        site.state_dir.parents[2] / "server" / "server.json"
    ).aggregation.active


def test_old_site_config_gets_the_safe_default(tmp_path: Path) -> None:
    path = _site_json(tmp_path)
    config = json.loads(path.read_text())
    del config["policy"]
    path.write_text(json.dumps(config))
    site = load_site_config(path)
    assert site.policy == SitePolicy()
    assert site.policy.aggregations == ("secagg", "secagg+", "ckks")
    assert site.policy.require_active and not site.policy.accepts("plain")


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"aggregations": ["plain"]}, "policy.allow_plain"),
        ({"aggregations": []}, "policy.aggregations"),
        ({"aggregations": ["rot13"]}, "policy.aggregations"),
        ({"aggregations": "secagg"}, "policy.aggregations"),
        ({"corrupt_fraction": 0.7}, "policy.corrupt_fraction"),
        ({"dropout_rate": -0.1}, "policy.dropout_rate"),
        ({"vector_length": 0}, "policy.vector_length"),
        ({"require_active": "yes"}, "policy.require_active"),
        ({"typo": 1}, "unknown keys in policy"),
    ],
)
def test_policy_errors_name_the_field(tmp_path: Path, section: dict, words: str) -> None:
    path = _site_json(tmp_path)
    config = json.loads(path.read_text())
    config["policy"] = section
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=words):
        load_site_config(path)


def test_policy_round_trips_through_json() -> None:
    p = SitePolicy(("plain", "secagg"), True, False, 0.1, 0.2, 7)
    assert SitePolicy(**{**policy_to_json(p), "aggregations": ("plain", "secagg")}) == p


def _check(p: SitePolicy, **overrides: object) -> None:
    args: dict[str, object] = dict(
        announced="secagg",
        protocol="secagg",
        active=True,
        num_sites=4,
        k=3,
        threshold=3,
        vector_length=10,
        model_length=10,
    )
    args.update(overrides)
    policy.check_secagg_round(p, **args)  # type: ignore[arg-type]


def test_secagg_round_checks_name_what_was_asked() -> None:
    p = SitePolicy()
    _check(p)
    for overrides, words in [
        ({"threshold": 2}, "below this site's minimum 3"),
        ({"active": False}, "semi-honest"),
        ({"vector_length": 11}, "vector_length is 11"),
        ({"protocol": "secagg+"}, "started as 'secagg'"),
        ({"announced": "plain", "protocol": "plain"}, "'plain'"),
    ]:
        with pytest.raises(PolicyError, match=words):
            _check(p, **overrides)
    _check(SitePolicy(require_active=False), active=False, threshold=2)  # opted in, by name
    with pytest.raises(PolicyError, match="this site expects 9"):
        _check(SitePolicy(vector_length=9))  # the pinned length wins over the model's
    with pytest.raises(PolicyError, match="minimum 4"):
        _check(SitePolicy(corrupt_fraction=0.3))  # c = 2 of 4: 2t > 4 + 2
    sparse = {"protocol": "secagg+", "announced": "secagg+", "num_sites": 8, "k": 2}
    with pytest.raises(PolicyError, match="masking degree k=2"):
        _check(SitePolicy(aggregations=("secagg+",)), **sparse, threshold=2)
    _check(SitePolicy(aggregations=("secagg+",), dropout_rate=0.0), **sparse, threshold=2)


@given(n=st.integers(2, 40), data=st.data())
def test_accepted_thresholds_keep_the_active_bound(n: int, data: st.DataObject) -> None:
    """Whatever the server proposes for a complete graph, an accepted threshold satisfies
    2t > n + c (Bonawitz et al. 2017), with c the corrupt sites the site assumes, and the round
    keeps at least two sites beyond them (n - c >= 2)."""
    fraction = data.draw(st.sampled_from([0.0, 0.1, 0.2, 0.3]))
    t = data.draw(st.integers(2, n))
    corrupt = min(-(-int(fraction * 1000) * n // 1000), n - 1)
    try:
        _check(SitePolicy(corrupt_fraction=fraction), num_sites=n, k=n - 1, threshold=t)
    except PolicyError:
        assert 2 * t <= n + corrupt or t > n or n - corrupt < 2
    else:
        assert 2 * t > n + corrupt and n - corrupt >= 2


def test_contribution_guard_refuses_stale_ids_and_second_releases(tmp_path: Path) -> None:
    path = tmp_path / "contributions.json"
    guard = ContributionGuard(path, "fed")
    m0, m1 = b"\x00" * 32, b"\x01" * 32
    guard.check_fresh(0, m0)
    guard.record_round(0)
    guard.record_release(0, m0)
    guard.record_release(0, m0)  # the same round again (a resent unmask): fine
    with pytest.raises(PolicyError, match="not fresh"):
        guard.check_fresh(0, m1)
    with pytest.raises(PolicyError, match="same model"):
        guard.check_fresh(1, m0)
    with pytest.raises(PolicyError, match="release it again"):
        guard.record_release(1, m0)
    guard.check_fresh(1, m1)
    # The record survives a restart (a new guard over the same file) and is per federation.
    with pytest.raises(PolicyError, match="not fresh"):
        ContributionGuard(path, "fed").check_fresh(0, m1)
    ContributionGuard(path, "another").check_fresh(0, m0)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        guard.check_fresh(5, m1)


def test_provision_command_writes_the_variant_by_name(tmp_path: Path) -> None:
    from secure_fl.transport.cli import main as cli_main

    root = tmp_path / "fed"
    args = ["provision", str(root), "--sites", "a,b", "--protocol", "secagg"]
    assert cli_main([*args, "--variant", "semi-honest", "--corrupt-fraction", "0.2"]) == 0
    site = load_site_config(root / "sites" / "a" / "site.json")
    server = load_server_config(root / "server" / "server.json")
    assert not site.policy.require_active and not server.aggregation.active
    assert site.policy.corrupt_fraction == server.aggregation.corrupt_fraction == 0.2
    assert cli_main([*args[:1], str(tmp_path / "g"), *args[2:]]) == 0
    assert load_site_config(tmp_path / "g" / "sites" / "b" / "site.json").policy.require_active


def test_server_round_ids_are_fresh_across_attempts_and_restarts(tmp_path: Path) -> None:
    from secure_fl.transport.server import FederationServer

    done = provision(tmp_path / "fed", ["a", "b"], ckks=False)
    config = load_server_config(done.server_config)
    config.state_dir.mkdir(parents=True)
    first = FederationServer(config)
    assert [first._new_round_id() for _ in range(3)] == [0, 1, 2]
    assert FederationServer(config)._new_round_id() == 3  # a restarted server never reuses one
    (config.state_dir / "round_ids.json").unlink()  # lost: the history still says what was used
    again = FederationServer(config)
    again._history = [{"round": 0, "round_id": 7}]
    assert again._new_round_id() == 8


def test_a_small_round_does_not_shrink_the_colluders_a_site_assumes() -> None:
    """A server that invites only 4 of 20 rostered sites must not thereby lower the number of
    colluders the site assumes: corrupt_fraction 0.1 of 20 sites is 2 colluders, so a 4-site
    round needs 2t > 4 + 2 (t >= 4), not the 2t > 4 + 1 that 0.1 of the round's 4 would give."""
    p = SitePolicy(corrupt_fraction=0.1)
    _check(p, num_sites=4, k=3, threshold=3)  # judged by the round alone: accepted
    with pytest.raises(PolicyError, match="minimum 4"):
        _check(p, num_sites=4, k=3, threshold=3, roster_size=20)
    _check(p, num_sites=4, k=3, threshold=4, roster_size=20)
    assert policy.round_corrupt_fraction(0.1, 4, 20) == 0.5
    assert policy.round_corrupt_fraction(0.0, 4, 20) == 0.0
    assert policy.round_corrupt_fraction(0.5, 4, 20) == 1.0


def test_a_round_where_every_other_site_may_be_a_colluder_is_refused() -> None:
    """Finding 5: corrupt_fraction 0.2 of 10 rostered sites is c = 2 colluders; in a 3-site round
    the two others may both be colluders, and the sum minus their inputs is this site's input,
    whatever the threshold. Refused before anything is sent; n - c >= 2 passes; two-site rounds
    with c = 0 stay allowed."""
    p = SitePolicy(corrupt_fraction=0.2)
    for n in (2, 3):
        with pytest.raises(PolicyError, match=r"up to 2 colluders.*at least 4 sites"):
            _check(p, num_sites=n, k=n - 1, threshold=n, roster_size=10)
    _check(p, num_sites=4, k=3, threshold=4, roster_size=10)  # two sites beyond the colluders
    with pytest.raises(PolicyError, match="at least 3 sites"):  # c = 1 of 10: no 2-site round
        _check(SitePolicy(corrupt_fraction=0.1), num_sites=2, k=1, threshold=2, roster_size=10)
    _check(SitePolicy(), num_sites=2, k=1, threshold=2, roster_size=10)  # c = 0: allowed
    assert policy.round_colluders(0.2, 3, 10) == 2
    assert policy.round_colluders(0.0, 2, 10) == 0


def test_provision_cli_writes_the_privacy_section_and_the_site_floor(tmp_path: Path) -> None:
    """`secure-fl provision ... --privacy site --target-epsilon 8`: the server gets the privacy
    section (and so writes the ledger the audit reads); with distributed trust every site pins
    the noise floor in its own policy."""
    from secure_fl.transport.cli import main as cli_main

    args = ["provision", str(tmp_path / "c"), "--sites", "a,b,c,d", "--protocol", "secagg+"]
    assert cli_main([*args, "--privacy", "site", "--target-epsilon", "8"]) == 0
    server = load_server_config(tmp_path / "c" / "server" / "server.json")
    assert server.privacy is not None and server.privacy.level == "site"
    assert server.privacy.target_epsilon == 8.0 and server.privacy.trust == "central"
    args[1] = str(tmp_path / "d")
    assert (
        cli_main([*args, "--privacy", "site", "--trust", "distributed", "--target-epsilon", "8"])
        == 0
    )
    site = load_site_config(tmp_path / "d" / "sites" / "a" / "site.json")
    assert site.policy.require_dp and site.policy.min_noise_multiplier is not None
    # No privacy by default.
    args[1] = str(tmp_path / "e")
    assert cli_main(args) == 0
    assert load_server_config(tmp_path / "e" / "server" / "server.json").privacy is None
