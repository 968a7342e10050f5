"""DP that learns: calibration with the tight accountant when ``privacy.accountant = "prv"`` asks
for it, in the trainer's own DP-SGD and in the simulated runner's calibration."""

from __future__ import annotations

from secure_fl.privacy.accounting import compute_epsilon
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.session import calibrate_multiplier
from secure_fl.training.dp_sgd import sample_rate, steps_per_epoch
from secure_fl.training.site_dp import TrainerDP

TARGET, DELTA = 8.0, 1e-5


def test_prv_calibration_is_tighter_than_rdp_and_meets_the_target() -> None:
    shape = {"batch_size": 16, "n_cases": 64, "epochs": 2, "rounds": 5}
    sigma = {}
    for accountant in ("rdp", "prv"):
        privacy = PrivacyConfig(
            level="sample", target_epsilon=TARGET, delta=DELTA, accountant=accountant
        )
        sigma[accountant] = (
            TrainerDP(privacy, samples_per_volume=1).settings(**shape).noise_multiplier
        )
    q = sample_rate(16, 64)
    steps = 5 * 2 * steps_per_epoch(16, 64)
    # The tight accountant needs less noise for the same guarantee ...
    assert sigma["prv"] < sigma["rdp"] * 0.97
    # ... and the guarantee holds with it (its own upper estimate), and is nearly spent.
    assert TARGET - 0.1 <= compute_epsilon(sigma["prv"], q, steps, DELTA, "prv") <= TARGET
    # The simulated runner's calibration (privacy_run.PrivacyRound.prepare) asks the same.
    runner = calibrate_multiplier(
        PrivacyConfig(level="sample", target_epsilon=TARGET, delta=DELTA, accountant="prv"),
        q,
        steps,
    )
    assert runner == sigma["prv"]
