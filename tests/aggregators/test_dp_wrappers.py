"""DP wrappers around aggregators: the noise is really there, sized as claimed, from the CSPRNG."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest

from secure_fl.aggregators import create
from secure_fl.aggregators.dp import CentralGaussian, DistributedNoise
from secure_fl.errors import ConfigError
from secure_fl.privacy.codec_noise import CodecNoiseConfig
from secure_fl.privacy.distributed import DistributedDPConfig, honest_noise_threshold

DIM = 4000


def _updates(n: int, dim: int = DIM, scale: float = 0.0, seed: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": [rng.normal(0.0, scale, dim) if scale else np.zeros(dim)] for i in range(n)}


def _std(result: Any, exact: np.ndarray) -> float:
    return float(np.std(np.asarray(result.mean[0]) - exact))


# -- central Gaussian ---------------------------------------------------------------------------


def test_central_noise_on_the_mean_has_the_claimed_std() -> None:
    updates = _updates(4, scale=0.01)
    exact = np.mean([u[0] for u in updates.values()], axis=0)
    wrapper = CentralGaussian(create("plain"), clip=2.0, noise_multiplier=1.5)
    result = wrapper.aggregate(updates)
    # std on the sum z * clip = 3.0; on the mean of 4 equal weights 0.75
    assert _std(result, exact) == pytest.approx(0.75, rel=0.06)
    assert result.event is not None
    assert result.event.noise_std == pytest.approx(3.0)
    assert result.event.trust == "central" and result.event.survivors == 4
    assert result.event.noise_source == "csprng"


def test_central_noise_is_sized_for_the_heaviest_survivor() -> None:
    updates = _updates(3)
    weights = {"s0": 1.0, "s1": 1.0, "s2": 2.0}
    result = CentralGaussian(create("plain"), clip=1.0, noise_multiplier=2.0).aggregate(
        updates, weights
    )
    # sensitivity of the weighted mean to s2: w_max * clip / sum(w) = 0.5
    assert _std(result, np.zeros(DIM)) == pytest.approx(2.0 * 0.5, rel=0.06)


def test_central_updates_are_clipped_and_counted_before_the_sum() -> None:
    updates = {"a": [np.full(100, 10.0)], "b": [np.zeros(100)]}
    result = CentralGaussian(create("plain"), clip=1.0, noise_multiplier=0.0).aggregate(updates)
    assert result.report["clipped_updates"] == ["a"]
    assert result.event is not None and result.event.clipped_updates == ("a",)
    # a clipped to norm 1 (each value 0.1), mean with zeros: 0.05
    np.testing.assert_allclose(result.mean[0], 0.05, rtol=1e-9)


def test_central_noise_over_secure_aggregation_with_a_dropout() -> None:
    updates = _updates(4, dim=64)
    wrapper = CentralGaussian(create("secagg", seed=3), clip=1.0, noise_multiplier=1.0)
    result = wrapper.aggregate(updates, dropped=["s3"])
    assert result.report["included"] == ["s0", "s1", "s2"]
    assert result.event is not None and result.event.survivors == 3
    assert float(np.max(np.abs(result.mean[0]))) > 0.0  # zeros plus noise


def test_noise_comes_from_os_urandom_unless_a_seed_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        out: bytes = real(n)
        return out

    monkeypatch.setattr(os, "urandom", counting)
    updates = _updates(2, dim=32)
    first = CentralGaussian(create("plain"), clip=1.0, noise_multiplier=1.0).aggregate(updates)
    second = CentralGaussian(create("plain"), clip=1.0, noise_multiplier=1.0).aggregate(updates)
    assert calls, "the noise generator was not seeded from os.urandom"
    assert not np.allclose(first.mean[0], second.mean[0])
    calls.clear()
    seeded = [
        CentralGaussian(create("plain"), clip=1.0, noise_multiplier=1.0, seed=7).aggregate(updates)
        for _ in range(2)
    ]
    assert not calls
    np.testing.assert_array_equal(seeded[0].mean[0], seeded[1].mean[0])
    assert seeded[0].event is not None and seeded[0].event.noise_source == "seeded"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip": 0.0, "noise_multiplier": 1.0}, "clip"),
        ({"clip": 1.0, "noise_multiplier": -1}, "noise"),
    ],
)
def test_central_refuses_bad_parameters(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CentralGaussian(create("plain"), **kwargs)


# -- distributed noise --------------------------------------------------------------------------


def _ddg(n: int, honest: int, dim: int, z: float = 1.0) -> DistributedDPConfig:
    return DistributedDPConfig(
        mechanism="discrete_gaussian",
        clip=1.0,
        noise_multiplier=z,
        threshold=honest,
        num_sites=n,
        bits=32,
        dimension=dim,
    )


def test_distributed_ddg_noise_is_present_with_the_claimed_std() -> None:
    dim = 2048
    cfg = _ddg(4, 3, dim)
    wrapper = DistributedNoise(create("secagg", threshold=3), cfg)
    result = wrapper.aggregate(_updates(4, dim=dim))
    assert result.event is not None
    # 4 shares sized for 3: std on the sum z * clip * sqrt(4/3); on the mean / 4
    expected = math.sqrt(4 / 3) / 4
    assert result.event.noise_std == pytest.approx(math.sqrt(4 / 3))
    assert _std(result, np.zeros(dim)) == pytest.approx(expected, rel=0.08)
    assert result.event.honest_survivors == 3 and result.event.noise_source == "csprng"


def test_distributed_noise_is_sized_for_the_honest_survivors() -> None:
    """n = 4, t = 3, c = 1: the noise must survive one colluder subtracting its share."""
    honest, colluders = honest_noise_threshold(3, 4, 0.25)
    assert (honest, colluders) == (2, 1)
    cfg = _ddg(4, honest, 256)
    inner = create("secagg", threshold=3, corrupt_fraction=0.25)
    result = DistributedNoise(inner, cfg, colluders=colluders).aggregate(_updates(4, dim=256))
    assert result.event is not None
    assert (result.event.threshold, result.event.honest_survivors) == (3, 2)
    # sized for t (3) instead of t - c (2): refused, a colluder would leave too little noise
    with pytest.raises(ConfigError, match="honest"):
        DistributedNoise(inner, _ddg(4, 3, 256), colluders=1).aggregate(_updates(4, dim=256))


def _codec(n: int, dim: int, z: float = 1.0, honest: int = 3) -> CodecNoiseConfig:
    return CodecNoiseConfig(
        mechanism="discrete_gaussian",
        clip=1.0,
        noise_multiplier=z,
        honest_threshold=honest,
        threshold=honest,
        colluders=0,
        num_sites=n,
        dimension=dim,
    )


def test_codec_noise_through_the_round_layer_hook() -> None:
    dim = 4000
    wrapper = DistributedNoise(create("secagg+", threshold=3), _codec(4, dim, z=2.0))
    result = wrapper.aggregate(_updates(4, dim=dim))
    # each of 4 sites: sigma = z * clip * w_max / sqrt(3) (w = 1/4) in mean units
    expected = 2.0 * 0.25 * math.sqrt(4 / 3)
    assert _std(result, np.zeros(dim)) == pytest.approx(expected, rel=0.06)
    assert result.event is not None and result.event.noise_std == pytest.approx(expected)
    assert result.event.noise_multiplier <= 2.0


def test_distributed_noise_refuses_what_it_cannot_protect() -> None:
    with pytest.raises(ConfigError, match="secagg"):
        DistributedNoise(create("plain"), _ddg(2, 1, 16))
    with pytest.raises(ConfigError, match="num_sites"):
        DistributedNoise(create("secagg"), _ddg(3, 2, 16)).aggregate(_updates(2, dim=16))
    with pytest.raises(ConfigError, match="equal"):
        DistributedNoise(create("secagg"), _ddg(2, 1, 16)).aggregate(
            _updates(2, dim=16), {"s0": 1.0, "s1": 2.0}
        )


def test_distributed_noise_is_fresh_unless_a_seed_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        out: bytes = real(n)
        return out

    monkeypatch.setattr(os, "urandom", counting)

    def run(seed: int | None) -> np.ndarray:
        wrapper = DistributedNoise(create("secagg", threshold=3), _codec(4, 64), seed=seed)
        result = wrapper.aggregate(_updates(4, dim=64))
        assert result.event is not None
        assert result.event.noise_source == ("csprng" if seed is None else "seeded")
        return np.asarray(result.mean[0])

    assert not np.array_equal(run(None), run(None))
    assert calls, "the noise shares were not seeded from os.urandom"
    np.testing.assert_array_equal(run(5), run(5))
