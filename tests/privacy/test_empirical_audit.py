"""The one-run empirical privacy audit (Steinke, Nasr, Jagielski 2023): the bound, the planted bug."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from privacy_testutils import sample_entry, write_run

from secure_fl.errors import ConfigError
from secure_fl.privacy import PrivacyConfig
from secure_fl.privacy.accounting import calibrate_noise, compute_epsilon
from secure_fl.privacy.audit import main as audit_main
from secure_fl.privacy.empirical import (
    audit_gaussian_sum,
    central_gaussian,
    empirical_audit_run,
    epsilon_lower_bound,
    p_value,
)

ROUNDS = 3
TARGET = 1.0  # accounted epsilon of the audited mechanism (delta 1e-5)


def _noise() -> float:
    return calibrate_noise(TARGET, 1.0, ROUNDS, 1e-5)


def test_bound_without_delta_matches_the_binomial_closed_form() -> None:
    # r guesses all correct, delta = 0: P[Bin(r, q) >= r] = q^r = 0.05 at the bound.
    r = 100
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(1000, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-4)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses() -> None:
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.95) == 0.0
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5, 0.95) for v in (130, 160, 190, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # delta makes the bound weaker, never stronger
    assert epsilon_lower_bound(1000, 200, 200, 1e-3, 0.95) < bounds[-1]
    # 200/200 at epsilon 0: only the delta term (2 m delta max_i ...) is left, below 2 m delta
    assert 0 < p_value(1000, 200, 200, 0.0, 1e-5) < 2 * 1000 * 1e-5
    assert p_value(1000, 200, 200, 0.0, 0.0) == pytest.approx(0.5**200)


@pytest.mark.parametrize(
    ("m", "r", "v", "field"),
    [(10, 20, 5, "v <= r <= m"), (10, 4, 5, "v <= r"), (10, 4, -1, "0 <= v")],
)
def test_bad_counts_are_refused(m: int, r: int, v: int, field: str) -> None:
    with pytest.raises(ConfigError, match="need 0 <= v <= r <= m"):
        epsilon_lower_bound(m, r, v, 1e-5, 0.95)


def test_planted_bug_noise_switched_off_is_flagged() -> None:
    z = _noise()
    accounted = compute_epsilon(z, 1.0, ROUNDS, 1e-5)
    assert accounted <= TARGET

    def no_noise(clip: float, noise_multiplier: float) -> object:
        return central_gaussian(seed=7)(clip, 0.0)  # the bug: the multiplier is ignored

    found = audit_gaussian_sum(
        clip=0.5,
        noise_multipliers=[z] * ROUNDS,
        delta=1e-5,
        accounted_epsilon=accounted,
        canaries=300,
        guesses=120,
        mechanism=no_noise,  # type: ignore[arg-type]
        seed=7,
    )
    assert found.correct == found.guesses
    assert found.lower_bound > 3 * accounted
    assert found.flagged


def test_correctly_noised_mechanism_is_not_flagged() -> None:
    z = _noise()
    accounted = compute_epsilon(z, 1.0, ROUNDS, 1e-5)
    found = audit_gaussian_sum(
        clip=0.5,
        noise_multipliers=[z] * ROUNDS,
        delta=1e-5,
        accounted_epsilon=accounted,
        canaries=300,
        guesses=120,
        seed=7,
    )
    assert found.lower_bound < accounted
    assert not found.flagged
    assert found.to_dict()["rounds"] == ROUNDS and found.seeded


def test_audit_arguments_are_checked() -> None:
    base = {"clip": 0.5, "noise_multipliers": [1.0], "delta": 1e-5, "accounted_epsilon": 1.0}
    with pytest.raises(ConfigError, match="guesses must be an even integer"):
        audit_gaussian_sum(**base, canaries=10, guesses=11)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="noise_multipliers"):
        audit_gaussian_sum(**{**base, "noise_multipliers": []})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clip"):
        audit_gaussian_sum(**{**base, "clip": 0.0})  # type: ignore[arg-type]


def _site_run(run: Path, z: float) -> Path:
    config = PrivacyConfig(level="site", noise_multiplier=z, clip=0.5, delta=1e-5)

    def entry(site: str, rnd: int) -> object:
        return sample_entry(
            site,
            rnd,
            level="site",
            noise_multiplier=z,
            clip=0.5,
            sample_rate=1.0,
            steps=1,
            survivors=2,
            params={"noise_source": "csprng"},
        )

    return write_run(run, config, rounds=ROUNDS, entry=entry)  # type: ignore[arg-type]


def test_run_audit_reads_clip_noise_and_rounds_from_the_ledger(tmp_path: Path) -> None:
    z = _noise()
    run = _site_run(tmp_path / "run", z)
    found = empirical_audit_run(run, canaries=300, guesses=120, seed=3)
    assert found.noise_multipliers == pytest.approx([z] * ROUNDS)
    assert found.clip == 0.5
    assert found.accounted_epsilon == pytest.approx(compute_epsilon(z, 1.0, ROUNDS, 1e-5))
    assert not found.flagged


def test_cli_flags_a_mechanism_without_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _site_run(tmp_path / "run", _noise())
    base = ["--no-report", "--empirical", "--canaries", "300", "--guesses", "120"]
    assert audit_main([str(run), *base]) == 0
    assert "consistent" in capsys.readouterr().out

    import secure_fl.privacy.empirical as empirical

    def broken(seed: int | None = None) -> object:
        original = central_gaussian(seed)
        return lambda clip, z: original(clip, 0.0)

    monkeypatch.setattr(empirical, "central_gaussian", broken)
    assert audit_main([str(run), *base]) == 1
    out = capsys.readouterr().out
    assert "FLAGGED" in out and "empirical audit: FAIL" in out


def test_cli_refuses_a_sample_level_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "run", PrivacyConfig(level="sample", noise_multiplier=1.0))
    assert audit_main([str(run), "--no-report", "--empirical"]) == 2
    assert "privacy.level='sample'" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["privacy"]["level"] == "sample"
