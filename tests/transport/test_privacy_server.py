"""DP over gRPC without sockets: the server's ledger and run folder pass the audit; the site's floor
refuses a server that would send less noise; provisioning writes both."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from secure_fl.errors import BudgetExceededError, ConfigError, PolicyError
from secure_fl.privacy import PrivacyConfig, PrivacyLedger, audit_run
from secure_fl.privacy.codec_noise import CodecNoiseConfig
from secure_fl.transport.config import (
    AggregationSettings,
    SitePolicy,
    load_server_config,
    load_site_config,
)
from secure_fl.transport.privacy import CentralClip, ServerPrivacy, SitePrivacy
from secure_fl.transport.provision import provision
from secure_fl.transport.provision_privacy import (
    add_privacy_arguments,
    privacy_floor,
    privacy_from_args,
)

ROSTER = ["a", "b", "c", "d"]
LIVE = {1: "a", 2: "b", 3: "c", 4: "d"}
WEIGHTS = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
DIM = 2000


def _server(run: Path, privacy: PrivacyConfig, rounds: int = 3) -> ServerPrivacy:
    return ServerPrivacy(
        privacy,
        run,
        rounds=rounds,
        roster=ROSTER,
        dimension=DIM,
        aggregation=AggregationSettings(protocol="secagg+"),
        min_sites=4,
        federation="fed",
    )


def _run_rounds(server: ServerPrivacy, rounds: range) -> list[np.ndarray]:
    out = []
    for r in rounds:
        server.before_round(r, LIVE)
        out.append(server.apply(r, np.zeros(DIM), LIVE, WEIGHTS, {}))
    return out


def _passes(run: Path) -> float:
    result = audit_run(run)
    assert result.status == "PASS", [f.message for f in result.findings]
    return max(result.federation_epsilon.values())


def test_central_trust_adds_the_noise_and_audits_clean(tmp_path: Path) -> None:
    privacy = PrivacyConfig(level="site", target_epsilon=8.0, clip=0.5, delta=1e-5)
    server = _server(tmp_path, privacy)
    text = server.before_round(0, LIVE)
    assert json.loads(text) == {"kind": "central_clip/v1", "clip": 0.5}
    assert server.l2_clip() == 0.5
    record: dict[str, object] = {}
    noised = server.apply(0, np.zeros(DIM), LIVE, WEIGHTS, record)
    # std on the mean: z * clip * max(w) / sum(w)
    assert float(np.std(noised)) == pytest.approx(server.session.nominal * 0.5 / 4, rel=0.08)
    assert "privacy" in record
    _run_rounds(server, range(1, 3))
    server.finish(3)
    assert _passes(tmp_path) <= 8.0 + 1e-6


def test_distributed_trust_sends_the_noise_and_audits_clean(tmp_path: Path) -> None:
    privacy = PrivacyConfig(
        level="site", trust="distributed", mechanism="discrete_gaussian", target_epsilon=8.0
    )
    server = _server(tmp_path, privacy, rounds=2)
    text = server.before_round(0, LIVE)
    cfg = CodecNoiseConfig.from_json(text)
    assert cfg.noise_multiplier == server.session.nominal and cfg.dimension == DIM
    # what the site computes from the JSON is what the ledger records
    assert cfg.effective_noise_multiplier() == pytest.approx(server.session.planned_noise)
    mean = np.ones(DIM)
    np.testing.assert_array_equal(server.apply(0, mean, LIVE, WEIGHTS, {}), mean)  # no server noise
    _run_rounds(server, range(1, 2))
    server.finish(2)
    assert _passes(tmp_path) <= 8.0 + 1e-6


def test_a_retried_attempt_records_its_intents_once(tmp_path: Path) -> None:
    server = _server(tmp_path, PrivacyConfig(level="site", noise_multiplier=1.0))
    server.before_round(0, LIVE)
    count = server.session._ledger().head().count
    server.before_round(0, LIVE)  # the first attempt failed; the round is retried
    assert server.session._ledger().head().count == count
    server.apply(0, np.zeros(DIM), LIVE, WEIGHTS, {})
    with pytest.raises(ConfigError, match="no recorded privacy intents"):
        server.apply(0, np.zeros(DIM), LIVE, WEIGHTS, {})


def test_a_budget_stop_is_written_and_explained_to_the_audit(tmp_path: Path) -> None:
    # epsilon after 2 rounds 7.08, after 3 rounds 9.01: the third round is refused
    privacy = PrivacyConfig(level="site", noise_multiplier=1.0, site_budget=8.0)
    server = _server(tmp_path, privacy, rounds=5)
    _run_rounds(server, range(2))
    with pytest.raises(BudgetExceededError):
        server.before_round(2, LIVE)
    server.finish(2)
    stop = json.loads((tmp_path / "stopped.json").read_text())
    assert stop["round"] == 3 and stop["strategy"] == "fedavg"
    result = audit_run(tmp_path)
    assert result.status == "PASS", [f.message for f in result.findings]
    assert any(f.code == "BUDGET_STOP" for f in result.findings)


def test_a_restart_continues_the_ledger_and_refuses_other_settings(tmp_path: Path) -> None:
    privacy = PrivacyConfig(level="site", target_epsilon=8.0, delta=1e-5)
    server = _server(tmp_path, privacy)
    _run_rounds(server, range(1))
    server.finish(1)
    with pytest.raises(ConfigError, match="another configuration"):
        _server(tmp_path, PrivacyConfig(level="site", target_epsilon=4.0, delta=1e-5))
    again = _server(tmp_path, privacy)
    _run_rounds(again, range(1, 3))
    again.finish(3)
    with PrivacyLedger(tmp_path / "privacy_ledger.sqlite", readonly=True) as ledger:
        assert {e.entry.round for e in ledger.entries()} == {0, 1, 2}
    assert _passes(tmp_path) <= 8.0 + 1e-6


@pytest.mark.parametrize(
    ("privacy", "match"),
    [
        (PrivacyConfig(level="sample", noise_multiplier=1.0), "level"),
        (PrivacyConfig(level="site", noise_multiplier=1.0, reproducible_noise=True), "reproduc"),
        (PrivacyConfig(level="site", noise_multiplier=1.0, site_sample_rate=0.5), "sample_rate"),
    ],
)
def test_the_server_refuses_privacy_it_cannot_serve(
    tmp_path: Path, privacy: PrivacyConfig, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _server(tmp_path, privacy)


# -- the site's floor (adversarial: a server sending less noise than the site requires) ---------


def _site(floor: float | None, corrupt_fraction: float = 0.0) -> SitePrivacy:
    policy = SitePolicy(
        require_dp=True, min_noise_multiplier=floor, corrupt_fraction=corrupt_fraction
    )
    return SitePrivacy(policy, roster_size=4)


def test_a_site_refuses_distributed_noise_below_its_floor(tmp_path: Path) -> None:
    privacy = PrivacyConfig(
        level="site", trust="distributed", mechanism="discrete_gaussian", target_epsilon=8.0
    )
    floor = privacy_floor(privacy, "secagg+", 3)["min_noise_multiplier"]
    honest = _server(tmp_path, privacy).before_round(0, LIVE)
    cfg = _site(floor).check(honest)
    assert isinstance(cfg, CodecNoiseConfig)
    weaker = CodecNoiseConfig.from_json(honest)
    lowered = CodecNoiseConfig(
        **{**weaker.__dict__, "noise_multiplier": weaker.noise_multiplier * 0.9}
    ).to_json()
    with pytest.raises(PolicyError, match="floor"):
        _site(floor).check(lowered)
    with pytest.raises(PolicyError, match="require_dp"):
        _site(floor).check("")
    with pytest.raises(PolicyError, match="central"):
        _site(floor).check(CentralClip(1.0).to_json())
    with pytest.raises(PolicyError, match="colluders"):
        _site(floor, corrupt_fraction=0.25).check(honest)  # sized for c = 0, the site assumes 1
    with pytest.raises(PolicyError, match="unknown"):
        _site(floor).check('{"kind": "bogus/v9"}')


def test_without_a_floor_central_trust_gives_a_clip_hook() -> None:
    site = SitePrivacy(SitePolicy(), roster_size=4)
    assert site.check("") is None
    cfg = site.check(CentralClip(0.5).to_json())
    assert cfg == CentralClip(0.5)
    hook = site.noise_hook(cfg)
    values = np.arange(4, dtype=np.uint32)

    class Setup:
        l2_clip = 0.5
        distributed_dp_json = CentralClip(0.5).to_json()

    assert hook(values, Setup()) is values
    Setup.l2_clip = 1.0
    with pytest.raises(PolicyError, match="central bound"):
        hook(values, Setup())


# -- provisioning ---------------------------------------------------------------------------


def test_provision_writes_the_privacy_section_and_the_site_floor(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_privacy_arguments(parser)
    args = parser.parse_args(
        ["--privacy", "site", "--trust", "distributed", "--target-epsilon", "8"]
    )
    privacy = privacy_from_args(args)
    assert privacy is not None and privacy.mechanism == "discrete_gaussian"
    done = provision(tmp_path / "fed", ROSTER, protocol="secagg+", privacy=privacy, ckks=False)
    server = load_server_config(done.server_config)
    assert server.privacy == privacy and server.min_sites == 4
    site = load_site_config(done.site_configs["a"])
    assert site.policy.require_dp is True
    assert site.policy.min_noise_multiplier == pytest.approx(
        privacy_floor(privacy, "secagg+", 3)["min_noise_multiplier"]
    )
    none = privacy_from_args(parser.parse_args([]))
    assert none is None
    with pytest.raises(ConfigError, match="secagg"):
        provision(tmp_path / "fed2", ROSTER, protocol="plain", privacy=privacy, ckks=False)


# -- issue 11, second review: survivors off the round (b4), DP rounds with fewer sites (b6) --------


def test_apply_refuses_survivors_the_round_did_not_charge(tmp_path: Path) -> None:
    privacy = PrivacyConfig(level="site", target_epsilon=8.0, delta=1e-5, clip=1.0)
    server = _server(tmp_path / "run", privacy, rounds=1)
    three = {1: "a", 2: "b", 3: "c"}
    server.before_round(0, three)
    for survivors in ({**three, 9: "zz"}, {1: "a", 4: "d"}, {1: "b"}):
        with pytest.raises(ConfigError, match="not among its participants"):
            server.apply(0, np.zeros(DIM), survivors, dict.fromkeys(survivors, 1.0), {})
    server.apply(0, np.zeros(DIM), three, dict.fromkeys(three, 1.0), {})
    server.finish(1)
    _passes(tmp_path / "run")


def test_the_audit_flags_a_metrics_survivor_the_ledger_did_not_charge(tmp_path: Path) -> None:
    privacy = PrivacyConfig(level="site", target_epsilon=8.0, delta=1e-5, clip=1.0)
    run = tmp_path / "run"
    server = _server(run, privacy, rounds=1)
    _run_rounds(server, range(1))
    server.finish(1)
    assert _passes(run) > 0
    metrics = run / "metrics.jsonl"
    row = json.loads(metrics.read_text())
    row["survivors"] = [*row["survivors"], "mallory"]
    metrics.write_text(json.dumps(row) + "\n")
    findings = audit_run(run).findings
    assert [f.site for f in findings if f.code == "UNCHARGED_SURVIVOR"] == ["mallory"]


@pytest.mark.parametrize("live", [9, 6])
def test_a_distributed_dp_round_with_fewer_sites_plans_the_noise_threshold(
    tmp_path: Path, live: int
) -> None:
    from secure_fl.transport.server_rounds import dp_noise_threshold, secagg_open

    parser = argparse.ArgumentParser()
    add_privacy_arguments(parser)
    args = ["--privacy", "site", "--target-epsilon", "8", "--trust", "distributed"]
    names = [f"s{i}" for i in range(10)]
    fed = provision(tmp_path / "fed", names, privacy=privacy_from_args(parser.parse_args(args)))
    config = load_server_config(fed.server_config)
    server = ServerPrivacy.from_config(config, tmp_path / "run")
    participants = {e.site_id: e.name for e in config.roster[:live]}
    dp_json = server.before_round(0, participants)
    noise_t = dp_noise_threshold(dp_json)
    assert noise_t is not None and noise_t <= live
    sa = secagg_open(
        config,
        dict.fromkeys(participants, 1.0),
        round_id=1,
        vector_length=server.dimension,
        distributed_dp_json=dp_json,
        l2_clip=server.l2_clip(),
    )
    assert sa.record["threshold"] >= noise_t
    CodecNoiseConfig.from_json(dp_json).check_plan(sa.round.plan)  # the sites accept it
    with pytest.raises(ConfigError, match="cannot reach the noise threshold"):
        secagg_open(
            config,
            {s: 1.0 for s in list(participants)[: noise_t - 1]},
            round_id=2,
            vector_length=server.dimension,
            distributed_dp_json=dp_json,
            l2_clip=server.l2_clip(),
        )
