"""The shared site-level bookkeeping (simulation runner and gRPC server): calibration, intents,
budget refusal before anything is recorded, resume recalibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.privacy import PrivacyConfig
from secure_fl.privacy.accounting import calibrate_noise, compute_epsilon
from secure_fl.privacy.session import DistributedSizing, SiteLevelSession

SITES = ("a", "b", "c")


def _session(tmp_path: Path, privacy: PrivacyConfig, rounds: int = 3, **kw: object) -> Any:
    session = SiteLevelSession(privacy, rounds, SITES, **kw)  # type: ignore[arg-type]
    session.open(tmp_path)
    session.calibrate()
    return session


def test_calibrated_for_unamplified_rounds_and_charged_per_participant(tmp_path: Path) -> None:
    privacy = PrivacyConfig(level="site", target_epsilon=4.0, delta=1e-5)
    session = _session(tmp_path, privacy)
    assert session.nominal == pytest.approx(calibrate_noise(4.0, 1.0, 3, 1e-5))
    entries = session.planned(0, {"a", "b"})
    assert [e.steps for e in entries] == [1, 1, 0] and {e.sample_rate for e in entries} == {1.0}
    for r in range(3):
        session.before_round(r, set(SITES))
        row = session.after_round(None)
    assert row["max_epsilon"] <= 4.0 + 1e-9
    assert row["ledger_head"]["count"] == 18  # 3 intents + 3 confirmations per round
    session.close()


def test_distributed_noise_is_raised_until_its_equivalent_meets_the_target(
    tmp_path: Path,
) -> None:
    privacy = PrivacyConfig(
        level="site", trust="distributed", mechanism="skellam", noise_multiplier=2.0
    )
    sizing = DistributedSizing(3, 2, 1, effective=lambda z: 0.9 * z)
    session = _session(tmp_path, privacy, distributed=sizing)
    assert session.planned_noise >= 2.0 and session.nominal > 2.0
    params = session.params()
    assert (params["threshold"], params["honest_survivors"], params["colluders"]) == (3, 2, 1)
    with pytest.raises(ConfigError, match="distributed"):
        SiteLevelSession(privacy, 3, SITES)  # distributed trust without its sizing


def test_a_round_over_budget_is_refused_before_any_intent(tmp_path: Path) -> None:
    eps2 = compute_epsilon(1.0, 1.0, 2, 1e-5)
    privacy = PrivacyConfig(level="site", noise_multiplier=1.0, site_budget=eps2 + 0.1)
    session = _session(tmp_path, privacy, rounds=5)
    for r in range(2):
        session.before_round(r, set(SITES))
        session.after_round(None)
    count = session._ledger().head().count
    with pytest.raises(BudgetExceededError):
        session.before_round(2, set(SITES))
    assert session._ledger().head().count == count
    session.close()


def test_resume_raises_the_remaining_noise_only_when_needed(tmp_path: Path) -> None:
    privacy = PrivacyConfig(level="site", target_epsilon=4.0, delta=1e-5)
    session = _session(tmp_path, privacy)
    session.before_round(0, set(SITES))
    session.after_round(None)
    assert session.recalibrate_for_resume(1, lambda _: set(SITES)) is None  # a clean resume
    session.before_round(1, set(SITES))  # interrupted: never confirmed
    again = _session(tmp_path, privacy)
    note = again.recalibrate_for_resume(1, lambda _: set(SITES))
    assert note is not None and "recalibrated" in note
    assert again.resumed is not None and again.resumed[0] > 1.0
    for r in (1, 2):
        again.before_round(r, set(SITES))
        row = again.after_round(None)
    assert row["max_epsilon"] <= 4.0 + 1e-6
    session.close()
    again.close()
