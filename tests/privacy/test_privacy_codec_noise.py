"""Distributed noise on the round's fixed-point integers: sizing, accounting, and a site's refusals."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
import pytest

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.privacy.codec_noise import CodecNoiseConfig, make_noise_hook, plan_parts
from secure_fl.privacy.distributed import gaussian_equivalent_noise_multiplier
from secure_fl.rounds.messages import SecAggSetup

D = 5000


def _cfg(**kw: Any) -> CodecNoiseConfig:
    base: dict[str, Any] = {
        "mechanism": "discrete_gaussian",
        "clip": 1.0,
        "noise_multiplier": 1.0,
        "honest_threshold": 2,
        "threshold": 3,
        "colluders": 1,
        "num_sites": 4,
        "dimension": D,
    }
    return CodecNoiseConfig(**{**base, **kw})


def _setup(cfg: CodecNoiseConfig, **kw: Any) -> SecAggSetup:
    base: dict[str, Any] = {
        "round_id": 0,
        "protocol": "secagg",
        "site_ids": (1, 2, 3, 4),
        "threshold": 3,
        "k": 3,
        "vector_length": D,
        "bits": 32,
        "active": False,
        "frac_bits": 20,
        "clip_range": 10.0,
        "weight": 0.25,
        "weights": {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0},
        "l2_clip": cfg.clip,
        "distributed_dp_json": cfg.to_json(),
    }
    return SecAggSetup(**{**base, **kw})


def test_json_round_trip_and_refusals() -> None:
    cfg = _cfg()
    assert CodecNoiseConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="kind"):
        CodecNoiseConfig.from_json('{"kind": "other"}')
    with pytest.raises(ConfigError, match="unknown"):
        CodecNoiseConfig.from_json(cfg.to_json()[:-1] + ',"extra":1}')
    with pytest.raises(ConfigError, match="honest_threshold"):
        _cfg(honest_threshold=3)  # must be threshold - colluders


def test_the_hook_adds_noise_of_the_planned_std() -> None:
    cfg = _cfg(noise_multiplier=2.0)
    setup = _setup(cfg)
    zeros = np.zeros(D, dtype=np.uint32)
    noised = make_noise_hook(cfg)(zeros, setup)
    signed = noised.view(np.int32).astype(np.float64)
    # sigma = z * clip * w_max * 2**frac_bits / sqrt(h)
    sigma = 2.0 * 0.25 * 2.0**20 / math.sqrt(2)
    assert cfg.sigma_site(plan_parts(setup)) == pytest.approx(sigma)
    assert float(np.std(signed)) == pytest.approx(sigma, rel=0.05)
    assert not np.any(zeros)  # the caller's array is untouched


def test_the_ledger_multiplier_is_a_lower_bound_for_every_accepted_plan() -> None:
    cfg = _cfg(noise_multiplier=1.3)
    z_ledger = cfg.effective_noise_multiplier()
    assert 0 < z_ledger <= 1.3
    for frac_bits in (16, 20, 24):
        setup = _setup(cfg, frac_bits=frac_bits)
        cfg.check_plan(setup)
        a = cfg.clip * 0.25 * 2.0**frac_bits
        actual = gaussian_equivalent_noise_multiplier(
            cfg.mechanism,
            l2_sensitivity=a + math.sqrt(D),  # unconditioned rounding
            dimension=D,
            sigma_site=cfg.sigma_site(plan_parts(setup)),
            survivors=cfg.honest_threshold,
        )
        assert actual >= z_ledger


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": 2}, "threshold"),  # the server lowered t: fewer honest shares suffice
        ({"l2_clip": None}, "no L2 clip"),
        ({"l2_clip": 2.0}, "l2_clip"),
        ({"distributed_dp_json": ""}, "other distributed-DP"),
        ({"vector_length": D - 1}, "vector length"),
        ({"frac_bits": 8}, "too coarse"),  # rounding would dominate the sensitivity
        ({"frac_bits": 30}, "sampler"),  # beyond the discrete Gaussian sampler's exact range
        ({"site_ids": (1, 2, 3, 4, 5), "weights": {i: 1.0 for i in range(1, 6)}}, "participants"),
    ],
)
def test_a_site_refuses_a_setup_that_would_weaken_its_noise(
    change: dict[str, Any], match: str
) -> None:
    cfg = _cfg()
    with pytest.raises(PolicyError, match=match):
        make_noise_hook(cfg)(np.zeros(D, dtype=np.uint32), _setup(cfg, **change))


def test_a_ring_without_headroom_for_the_noise_is_refused() -> None:
    cfg = _cfg(noise_multiplier=8.0)
    # 32 bits, clip_range 250 at 2**23: the signal nearly fills the ring, no room for the noise
    setup = _setup(cfg, frac_bits=23, clip_range=250.0)
    with pytest.raises(PolicyError, match="bits=32"):
        cfg.check_plan(setup)
    cfg.check_plan(dataclasses.replace(setup, bits=64))


def test_skellam_noise_beyond_its_sampler_is_refused() -> None:
    cfg = _cfg(mechanism="skellam")
    with pytest.raises(PolicyError, match="sampler"):
        cfg.check_plan(_setup(cfg, frac_bits=24))


def test_the_noise_is_drawn_from_os_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        out: bytes = real(n)
        return out

    monkeypatch.setattr(os, "urandom", counting)
    cfg = _cfg()
    hook = make_noise_hook(cfg)
    first = hook(np.zeros(D, dtype=np.uint32), _setup(cfg))
    second = hook(np.zeros(D, dtype=np.uint32), _setup(cfg))
    assert len(calls) == 2 and not np.array_equal(first, second)
