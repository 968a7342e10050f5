"""Budgets: a round that would exceed a site or federation budget is refused before it runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from privacy_testutils import sample_entry

from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.privacy import (
    LedgerIntegrityError,
    PrivacyLedger,
    check_budget,
    compute_epsilon,
    federation_epsilon,
)

DELTA = 1e-5


def one_round_eps(rounds: int) -> float:
    return compute_epsilon(1.0, 0.05, 20 * rounds, DELTA)


def run_until_refused(ledger: PrivacyLedger, budget: float) -> tuple[int, BudgetExceededError]:
    for rnd in range(100):
        planned = [sample_entry(s, rnd) for s in ("a", "b")]
        try:
            check_budget(ledger, planned, site_budget=budget, federation_budget=None, delta=DELTA)
        except BudgetExceededError as exc:
            return rnd, exc
        for p in planned:
            ledger.confirm(ledger.record_intent(p))
    raise AssertionError("never refused")


def test_round_over_site_budget_is_refused_with_spent_and_remaining(tmp_path: Path) -> None:
    budget = one_round_eps(3) + 1e-3  # exactly three rounds fit
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        refused_at, exc = run_until_refused(ledger, budget)
        assert refused_at == 3
        assert len(ledger.entries()) == 6  # the refused round recorded nothing
        spent, after = one_round_eps(3), one_round_eps(4)
        message = str(exc)
        assert "site 'a'" in message and "site 'b'" in message
        assert f"spent ε={spent:.4f}" in message
        assert f"would bring it to {after:.4f}" in message
        assert f"site budget {budget:.4f}" in message
        assert f"remaining {budget - spent:.4f}" in message
        assert ledger.spent("a", DELTA) == pytest.approx(spent)


def test_unconfirmed_intents_count_against_the_budget(tmp_path: Path) -> None:
    budget = one_round_eps(1) + 1e-3
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        ledger.record_intent(sample_entry("a", 0))  # crashed round, never confirmed
        with pytest.raises(BudgetExceededError, match="site 'a'"):
            check_budget(
                ledger,
                [sample_entry("a", 1)],
                site_budget=budget,
                federation_budget=None,
                delta=DELTA,
            )


def test_federation_budget_is_the_max_over_sites(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        for rnd in range(2):
            ledger.confirm(ledger.record_intent(sample_entry("a", rnd)))
        ledger.confirm(ledger.record_intent(sample_entry("b", 0)))
        assert federation_epsilon(ledger, DELTA) == pytest.approx(one_round_eps(2))
        seq = federation_epsilon(ledger, DELTA, composition="sequential")
        assert seq == pytest.approx(one_round_eps(3))
        status = check_budget(
            ledger,
            [sample_entry("b", 1)],
            site_budget=None,
            federation_budget=one_round_eps(2) + 1e-3,
            delta=DELTA,
        )
        assert status.federation_projected == pytest.approx(one_round_eps(2))
        assert status.projected["b"] == pytest.approx(one_round_eps(2))
        with pytest.raises(BudgetExceededError) as info:
            check_budget(
                ledger,
                [sample_entry("a", 2)],
                site_budget=None,
                federation_budget=one_round_eps(2) + 1e-3,
                delta=DELTA,
            )
        message = str(info.value)
        assert message.count("federation") == 2 and "remaining 0.0010" in message
        assert re.search(r"spent ε=\d+\.\d{4}", message)


def test_budget_check_refuses_a_tampered_ledger(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.confirm(ledger.record_intent(sample_entry("a", 0)))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE records SET steps=1 WHERE seq=1")  # hide most of the spend
    conn.close()
    with PrivacyLedger(path) as ledger, pytest.raises(LedgerIntegrityError):
        check_budget(
            ledger, [sample_entry("a", 1)], site_budget=100.0, federation_budget=None, delta=DELTA
        )


def test_budget_arguments_are_validated(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(ConfigError, match="site_budget"):
            check_budget(ledger, [], site_budget=-1.0, federation_budget=None, delta=DELTA)
        with pytest.raises(ConfigError, match="delta"):
            check_budget(ledger, [], site_budget=None, federation_budget=None, delta=0.0)
        with pytest.raises(ConfigError, match="accountant"):
            check_budget(
                ledger, [], site_budget=None, federation_budget=None, delta=DELTA, accountant="x"
            )


def test_resume_noise_scale_meets_the_target_exactly_once_recalibrated() -> None:
    """An interrupted round's intents were counted: the remaining rounds get just enough extra
    noise for the composition to stay within the target; a clean resume keeps its noise."""
    from secure_fl.privacy import PrivacyEvent, calibrate_noise, epsilon_of_events
    from secure_fl.privacy.budget import resume_noise_scale

    target, q, steps_per_round, rounds = 8.0, 0.05, 20, 5
    sigma = calibrate_noise(target, q, rounds * steps_per_round, DELTA)
    one = PrivacyEvent(sigma, q, steps_per_round)
    # clean resume after 2 rounds: the planned 3 remaining rounds fit as they are
    assert resume_noise_scale({"a": [one] * 2}, {"a": [one] * 3}, target, DELTA) == 1.0
    # interrupted in round 2: 3 rounds already counted, 3 still to run
    history = {"a": [one] * 3}
    scale = resume_noise_scale(history, {"a": [one] * 3}, target, DELTA)
    assert scale is not None and scale > 1.0
    scaled = PrivacyEvent(sigma * scale, q, steps_per_round)
    total = epsilon_of_events(history["a"] + [scaled] * 3, DELTA)
    assert target - 1e-3 <= total <= target
    # the history alone already holds the whole target: nothing fits
    assert resume_noise_scale({"a": [one] * 6}, {"a": [one]}, target, DELTA) is None


@given(
    done=st.integers(min_value=1, max_value=6),
    left=st.integers(min_value=1, max_value=6),
    target=st.floats(min_value=1.0, max_value=12.0),
)
@settings(max_examples=15, deadline=None)
def test_resume_noise_scale_never_overspends(done: int, left: int, target: float) -> None:
    from secure_fl.privacy import PrivacyEvent, epsilon_of_events
    from secure_fl.privacy.budget import resume_noise_scale

    one = PrivacyEvent(1.0, 0.1, 10)
    history = {"s": [one] * done}
    scale = resume_noise_scale(history, {"s": [one] * left}, target, DELTA)
    if scale is None:
        assert epsilon_of_events(history["s"] + [PrivacyEvent(1e4, 0.1, 10 * left)], DELTA) > target
    else:
        scaled = [PrivacyEvent(scale, 0.1, 10)] * left
        assert epsilon_of_events(history["s"] + scaled, DELTA) <= target
