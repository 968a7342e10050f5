"""Regression tests of the second attacker review of the gRPC site (issue 11): the masked input
is a release (b1: a server that never asks a site to unmask still rebuilds its self-mask from
the other sites' shares, so the DP round is recorded before the masked input is built), and the DP record is anchored in ``contributions.json`` (b2: deleting
or truncating ``dp_rounds.jsonl`` does not reset the budget). Sans-IO: real site drivers, a
scripted server."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from site_driver_helpers import DriverFed, make_federation, round_start
from test_site_hardening import _dp_setups, _run_secagg, _StubPrivacy

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.transport import tensors
from secure_fl.transport.rounds import sha256
from secure_fl.transport.site_dp import DP_RECORD, DPRoundRecord

TARGET = 1


def _federation(tmp_path: Path, budget: int) -> tuple[DriverFed, dict[int, Any], dict[int, Any]]:
    fed = make_federation(tmp_path, ["a", "b", "c", "d"], ckks=False)
    for name, config in fed.configs.items():
        limit = budget if config.site_id == TARGET else 10
        policy = dataclasses.replace(config.policy, max_dp_rounds=limit)
        fed.configs[name] = dataclasses.replace(config, policy=policy)
    pairs = {c.site_id: fed.driver(n, privacy=_StubPrivacy()) for n, c in fed.configs.items()}
    return fed, {s: d for s, (d, _) in pairs.items()}, {s: lg for s, (_, lg) in pairs.items()}


def _run_skipping_unmask(drivers: dict[int, Any], fed: DriverFed, round_id: int) -> Any:
    """One DP round in which the server never sends TARGET its unmask request."""
    return _run_secagg(
        drivers,
        fed,
        round_id,
        withhold=lambda kind, site: kind == "unmask_request" and site == TARGET,
    )


def test_a_dp_round_is_recorded_before_the_masked_input_not_at_the_unmask(tmp_path: Path) -> None:
    fed, drivers, logs = _federation(tmp_path, budget=1)
    for d in drivers.values():
        assert d.handle(round_start(1, 1, fed.digest), fed.fetch).replies
    outcome = _run_skipping_unmask(drivers, fed, 1)
    assert TARGET in outcome.survivors  # the server got the sum without the target's answer
    target = drivers[TARGET]
    (entry,) = [json.loads(x) for x in (target.config.state_dir / DP_RECORD).read_text().split()]
    assert entry["round_id"] == 1 and entry["stage"] == "masked_input"
    # Round 2, a new model: the budget of one DP round is spent, the setup is refused.
    blob = tensors.dumps({k: v + 1.0 for k, v in fed.model.items()})
    assert target.handle(round_start(2, 2, sha256(blob)), lambda _: blob).replies
    _, setups = _dp_setups(fed, 2, sorted(drivers))
    assert target.handle(setups[TARGET], fed.fetch).replies == ()
    assert "max_dp_rounds=1" in logs[TARGET].named("policy-refused")[-1]["reason"]


_DP = {"mechanism": "m", "noise_multiplier": 1.0, "effective_noise_multiplier": 1.0, "clip": 1.0}


@pytest.mark.parametrize("tamper", ["delete", "drop_tail", "fresh_chain"])
def test_a_dp_record_shorter_than_its_anchor_refuses_the_start(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / DP_RECORD
    record = DPRoundRecord(path, "fed", max_rounds=3)
    for r in (1, 2, 3):
        record.claim(r, {1, 2, 3}, _DP)
    with pytest.raises(PolicyError, match="max_dp_rounds=3"):
        record.check_room(4)
    anchor = json.loads((tmp_path / "contributions.json").read_text())["fed"]
    assert anchor["dp_record_anchor"]["count"] == 3
    lines = path.read_text().splitlines()
    if tamper == "delete":
        path.unlink()
    elif tamper == "drop_tail":
        path.write_text(lines[0] + "\n")
    else:  # a fresh, valid one-line chain
        path.unlink()
        (tmp_path / "elsewhere").mkdir()
        DPRoundRecord(path, "fed", 3, anchor=tmp_path / "elsewhere" / "c.json").claim(9, {1}, _DP)
    with pytest.raises(ConfigError, match=r"contributions\.json anchors 3"):
        DPRoundRecord(path, "fed", max_rounds=3)  # the site's start
    with pytest.raises(ConfigError, match=re.escape(DP_RECORD)):
        record.check_room(4)


def test_the_anchor_survives_the_contribution_guard_and_a_grown_record(tmp_path: Path) -> None:
    from secure_fl.transport.replay import ContributionGuard

    path = tmp_path / DP_RECORD
    guard = ContributionGuard(tmp_path / "contributions.json", "fed")
    record = DPRoundRecord(path, "fed", max_rounds=None)
    guard.record_round(1)
    record.claim(1, {1, 2}, _DP)
    guard.record_release(1, b"\x01" * 32)  # rewrites contributions.json: the anchor stays
    record.claim(2, {1, 2}, _DP)
    assert DPRoundRecord(path, "fed", None).rounds() == frozenset({1, 2})
