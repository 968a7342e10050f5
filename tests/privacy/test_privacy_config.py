"""PrivacyConfig validation: every bad value names its privacy.<field> and the allowed range."""

from __future__ import annotations

import json
import math

import pytest

from secure_fl.errors import ConfigError
from secure_fl.privacy import PrivacyConfig


def test_defaults_and_round_trip() -> None:
    cfg = PrivacyConfig()
    assert not cfg.enabled
    sample = PrivacyConfig(level="sample", noise_multiplier=1, site_budget=8.0)
    assert sample.noise_multiplier == 1.0 and isinstance(sample.noise_multiplier, float)
    data = json.loads(json.dumps(sample.to_dict()))
    assert PrivacyConfig.from_dict(data) == sample
    distributed = PrivacyConfig(
        level="site",
        trust="distributed",
        mechanism="skellam",
        target_epsilon=4.0,
        site_sample_rate=0.5,
        bits=20,
        federation_budget=6.0,
    )
    assert PrivacyConfig.from_dict(distributed.to_dict()) == distributed


def test_dp_randomness_is_csprng_unless_seeded_mode_is_named() -> None:
    default = PrivacyConfig(level="sample", noise_multiplier=1.0)
    assert default.reproducible_noise is False and default.noise_source == "csprng"
    seeded = PrivacyConfig.from_dict(
        {"level": "site", "noise_multiplier": 1.0, "reproducible_noise": True}
    )
    assert seeded.noise_source == "seeded"
    assert PrivacyConfig.from_dict(seeded.to_dict()) == seeded


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"level": "patient"}, "privacy.level"),
        ({"level": "sample", "trust": "local", "noise_multiplier": 1.0}, "privacy.trust"),
        ({"level": "sample", "mechanism": "laplace", "noise_multiplier": 1.0}, "privacy.mechanism"),
        ({"level": "sample"}, "privacy.noise_multiplier"),
        ({"level": "sample", "noise_multiplier": 1.0, "target_epsilon": 2.0}, "target_epsilon"),
        ({"noise_multiplier": 1.0}, "privacy.level"),
        ({"level": "sample", "noise_multiplier": 0.0}, "privacy.noise_multiplier"),
        ({"level": "sample", "noise_multiplier": math.inf}, "privacy.noise_multiplier"),
        ({"level": "sample", "target_epsilon": -1.0}, "privacy.target_epsilon"),
        ({"level": "sample", "noise_multiplier": 1.0, "delta": 0.0}, "privacy.delta"),
        ({"level": "sample", "noise_multiplier": 1.0, "delta": 1.0}, "privacy.delta"),
        ({"level": "sample", "noise_multiplier": 1.0, "clip": 0.0}, "privacy.clip"),
        ({"level": "site", "noise_multiplier": 1.0, "site_sample_rate": 0.0}, "site_sample_rate"),
        ({"level": "site", "noise_multiplier": 1.0, "site_sample_rate": 1.5}, "site_sample_rate"),
        ({"level": "sample", "noise_multiplier": 1.0, "accountant": "gdp"}, "privacy.accountant"),
        ({"level": "sample", "noise_multiplier": 1.0, "site_budget": 0.0}, "privacy.site_budget"),
        (
            {"level": "sample", "noise_multiplier": 1.0, "federation_budget": -2},
            "federation_budget",
        ),
        ({"level": "site", "noise_multiplier": 1.0, "bits": 4}, "privacy.bits"),
        ({"level": "site", "noise_multiplier": 1.0, "bits": 65}, "privacy.bits"),
        ({"level": "site", "noise_multiplier": 1.0, "bits": True}, "privacy.bits"),
        # distributed trust: site level and a discrete mechanism only
        # distributed trust needs DP: site level, or federated DP-SGD at sample level
        ({"level": "none", "trust": "distributed", "mechanism": "skellam"}, "privacy.trust"),
        ({"level": "site", "trust": "distributed", "noise_multiplier": 1.0}, "privacy.mechanism"),
        ({"level": "site", "mechanism": "skellam", "noise_multiplier": 1.0}, "privacy.mechanism"),
        ({"level": "sample", "target_epsilon": 5.0, "site_budget": 3.0}, "privacy.site_budget"),
        ({"level": "sample", "noise_multiplier": "1.0"}, "privacy.noise_multiplier"),
        (
            {"level": "sample", "noise_multiplier": 1.0, "reproducible_noise": "yes"},
            "privacy.reproducible_noise",
        ),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PrivacyConfig(**kwargs)  # type: ignore[arg-type]


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.epsilon"):
        PrivacyConfig.from_dict({"level": "sample", "noise_multiplier": 1.0, "epsilon": 3})
