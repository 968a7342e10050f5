"""The distributed DP mechanism: planning, noise sizing, accounting, encode/decode, SecAgg end to end."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import special, stats

from secure_fl.crypto import DeterministicRandom
from secure_fl.errors import ConfigError, InvalidUpdateError, ThresholdError
from secure_fl.privacy.discrete import rounded_l2_bound
from secure_fl.privacy.distributed import (
    DistributedDPConfig,
    decode_sum,
    distributed_rdp,
    effective_noise_multiplier,
    encode_site,
    gaussian_equivalent_noise_multiplier,
    honest_noise_threshold,
    l2_sensitivity,
    plan_distributed_bits,
)
from secure_fl.secagg import Phase, make_config, run_round

MECHS = ["discrete_gaussian", "skellam"]


def config(**overrides: object) -> DistributedDPConfig:
    fields: dict[str, object] = {
        "mechanism": "discrete_gaussian",
        "clip": 1.0,
        "noise_multiplier": 1.0,
        "threshold": 3,
        "num_sites": 5,
        "bits": 32,
        "dimension": 1000,
    }
    fields.update(overrides)
    return DistributedDPConfig(**fields)  # type: ignore[arg-type]


def planned_std(cfg: DistributedDPConfig, gamma: float, sites: int) -> float:
    d = cfg.padded_dimension
    a = cfg.clip / gamma
    z = cfg.noise_multiplier
    return math.sqrt(a * a * (sites**2 / d + sites * z * z / cfg.threshold) + sites / 4)


def lift(values: np.ndarray, bits: int) -> np.ndarray:
    return values.view(np.int32 if bits == 32 else np.int64).astype(np.int64)


# -- configuration and planning -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mechanism": "laplace"}, "mechanism"),
        ({"clip": 0.0}, "clip"),
        ({"clip": math.inf}, "clip"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 6}, "threshold"),
        ({"num_sites": 0}, "num_sites"),
        ({"bits": 16}, "bits"),
        ({"dimension": 0}, "dimension"),
        ({"dimension": 2.5}, "dimension"),
        ({"beta": 1.0}, "beta"),
        ({"k_stddevs": 0.0}, "k_stddevs"),
        ({"max_rounding_inflation": 0.0}, "max_rounding_inflation"),
    ],
)
def test_config_fields_are_validated(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        config(**overrides)


def test_config_is_frozen_and_plan_is_exposed() -> None:
    cfg = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip = 2.0  # type: ignore[misc]
    plan = plan_distributed_bits(cfg)
    _, _, bits_needed, headroom = plan
    assert plan == cfg.plan
    assert headroom == cfg.bits - bits_needed >= 0
    assert cfg.padded_dimension == 1024


@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("bits", [32, 64])
def test_plan_sizes_noise_for_threshold_and_fits_the_modulus(mech: str, bits: int) -> None:
    cfg = config(mechanism=mech, bits=bits, noise_multiplier=1.3, threshold=4, num_sites=7)
    gamma, sigma_site, bits_needed, _ = plan_distributed_bits(cfg)
    # threshold sites' shares sum to integer variance (z c / gamma)**2.
    assert 4 * sigma_site**2 == pytest.approx((1.3 * 1.0 / gamma) ** 2, rel=1e-12)
    # k stddevs of the sum of all sites' shares fit in the centred range of 2**bits.
    assert cfg.k_stddevs * planned_std(cfg, gamma, 7) <= 2 ** (bits - 1) - 1
    assert bits_needed <= bits
    # The rounding inflates the sensitivity by at most max_rounding_inflation.
    inflation = rounded_l2_bound(cfg.clip / gamma, cfg.padded_dimension, cfg.beta) * gamma
    assert inflation <= 1 + cfg.max_rounding_inflation


def test_gamma_fills_the_modulus_when_the_bits_bind() -> None:
    # A huge k_stddevs makes the modulus the binding constraint (the papers' choice of gamma).
    cfg = config(k_stddevs=2.0**12)
    gamma = cfg.plan.gamma
    assert cfg.k_stddevs * planned_std(cfg, gamma, cfg.num_sites) == pytest.approx(
        2**31 - 1, rel=1e-9
    )


def test_brief_example_fits_32_bits() -> None:
    cfg = config(num_sites=10, threshold=6, dimension=1_200_000)
    _, _, bits_needed, headroom = cfg.plan
    assert bits_needed <= 20 and headroom == 32 - bits_needed
    assert cfg.padded_dimension == 2**21


def test_bit_refusal_names_the_fields() -> None:
    with pytest.raises(ConfigError) as info:
        config(k_stddevs=1e9)
    message = str(info.value)
    for name in ("bits=32", "bits >=", "k_stddevs", "num_sites", "noise_multiplier", "dimension"):
        assert name in message
    config(k_stddevs=1e9, bits=64)  # 64 bits hold it


def test_noise_beyond_the_exact_sampler_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        config(mechanism="skellam", noise_multiplier=1000.0)
    config(mechanism="discrete_gaussian", noise_multiplier=1000.0)  # its sampler goes further
    with pytest.raises(ConfigError, match="noise_multiplier"):
        config(noise_multiplier=1e-12)  # per-site sigma below DDG Theorem 1's 1/2


# -- accounting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("dimension", [10, 1000, 100_000])
@pytest.mark.parametrize("z", [0.3, 1.0, 4.0])
def test_effective_noise_multiplier_never_beats_the_gaussian(
    mech: str, dimension: int, z: float
) -> None:
    cfg = config(mechanism=mech, dimension=dimension, noise_multiplier=z)
    z_eff = effective_noise_multiplier(cfg, cfg.threshold)
    assert 0.95 * z < z_eff <= z
    more = effective_noise_multiplier(cfg, cfg.num_sites)
    assert z_eff < more <= z * math.sqrt(cfg.num_sites / cfg.threshold)


@pytest.mark.parametrize("mech", MECHS)
def test_effective_noise_multiplier_tends_to_z_as_gamma_shrinks(mech: str) -> None:
    z, c, t, d = 1.0, 1.0, 3, 4096
    values = []
    for gamma in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        a = c / gamma
        values.append(
            gaussian_equivalent_noise_multiplier(
                mech,
                l2_sensitivity=rounded_l2_bound(a, d, math.exp(-0.5)),
                dimension=d,
                sigma_site=z * a / math.sqrt(t),
                survivors=t,
            )
        )
    assert all(v <= z for v in values)
    assert values == sorted(values)
    assert values[0] < 0.8 * z  # coarse rounding costs privacy ...
    assert values[-1] == pytest.approx(z, rel=1e-3)  # ... and vanishing rounding none


def test_ddg_tau_term_penalises_small_noise() -> None:
    # With per-site sigma near 1/2 the sum of discrete Gaussians is far from a discrete Gaussian.
    common = {"l2_sensitivity": 1.0, "dimension": 1000, "survivors": 10}
    small = gaussian_equivalent_noise_multiplier("discrete_gaussian", sigma_site=0.5, **common)  # type: ignore[arg-type]
    assert small < 0.5 * math.sqrt(10)  # well below the continuous-Gaussian value
    large = gaussian_equivalent_noise_multiplier("discrete_gaussian", sigma_site=5.0, **common)  # type: ignore[arg-type]
    assert large == pytest.approx(5.0 * math.sqrt(10), rel=1e-9)


def test_survivors_below_threshold_are_refused() -> None:
    cfg = config()
    with pytest.raises(ConfigError, match="threshold"):
        effective_noise_multiplier(cfg, 2)
    with pytest.raises(ConfigError, match="survivors"):
        effective_noise_multiplier(cfg, 6)
    with pytest.raises(ConfigError, match="threshold"):
        distributed_rdp(cfg, 2, [2.0])
    assert effective_noise_multiplier(config(noise_multiplier=0.0), 3) == 0.0


@pytest.mark.parametrize("mech", MECHS)
def test_rdp_curve_is_below_the_gaussian_equivalent(mech: str) -> None:
    # A coarse granularity (huge k_stddevs) so that the discrete corrections are not negligible.
    cfg = config(
        mechanism=mech,
        dimension=50,
        noise_multiplier=0.2,
        max_rounding_inflation=1.0,
        k_stddevs=2.0**28,
    )
    orders = np.array([1.1, 1.5, 2, 3, 8, 32, 256])
    z_eff = effective_noise_multiplier(cfg, 4)
    curve = distributed_rdp(cfg, 4, orders)
    # Skellam's bound is stated at integer orders: a fractional order is charged at its ceiling,
    # as the accountants do for PrivacyEvent(integer_orders=True).
    charged = np.ceil(orders) if mech == "skellam" else orders
    assert np.all(curve <= charged / (2 * z_eff**2) * (1 + 1e-12))


def test_skellam_rdp_is_charged_at_integer_orders() -> None:
    """Agarwal et al. bound Skellam's RDP at integer orders only: a fractional order gets the
    (valid, Renyi divergence being monotone in the order) bound of its ceiling."""
    cfg = config(mechanism="skellam", noise_multiplier=0.5)
    fractional = distributed_rdp(cfg, 4, [2.5, 5.2, 9.99])
    integer = distributed_rdp(cfg, 4, [3.0, 6.0, 10.0])
    np.testing.assert_array_equal(fractional, integer)
    dg = config(noise_multiplier=0.5)
    assert distributed_rdp(dg, 4, [2.5])[0] < distributed_rdp(dg, 4, [3.0])[0]  # zCDP: any order


@pytest.mark.parametrize(
    ("threshold", "n", "corrupt", "expected"),
    [(3, 4, 0.25, (2, 1)), (3, 4, 0.0, (3, 0)), (7, 10, 0.05, (6, 1)), (1, 1, 0.0, (1, 0))],
)
def test_noise_is_sized_for_honest_survivors(
    threshold: int, n: int, corrupt: float, expected: tuple[int, int]
) -> None:
    assert honest_noise_threshold(threshold, n, corrupt) == expected


def test_no_honest_survivor_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"corrupt_fraction.*privacy\.trust"):
        honest_noise_threshold(2, 4, 0.5)
    with pytest.raises(ConfigError, match="corrupt_fraction"):
        honest_noise_threshold(3, 4, 1.0)
    with pytest.raises(ConfigError, match="threshold"):
        honest_noise_threshold(5, 4, 0.0)


def test_colluders_subtracting_their_shares_leave_the_planned_noise() -> None:
    """n = 4, t = 3, c = 1: sized for t - c = 2, the two honest shares alone reach z; sized for t
    (the old plan) they give only about z * sqrt(2 / 3)."""
    honest, _ = honest_noise_threshold(3, 4, 0.25)
    sized = config(threshold=honest, num_sites=4, noise_multiplier=1.0)
    assert effective_noise_multiplier(sized, honest) == pytest.approx(1.0, rel=0.02)
    old = config(threshold=3, num_sites=4, noise_multiplier=1.0)
    # the coalition removes one of the 3 threshold shares: what remains is 2 shares of `old`
    remaining = gaussian_equivalent_noise_multiplier(
        "discrete_gaussian",
        l2_sensitivity=l2_sensitivity(old),
        dimension=old.padded_dimension,
        sigma_site=old.plan.sigma_site,
        survivors=2,
    )
    assert remaining < 0.83


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float) -> float:
    # Far tails whose pmf underflows carry no weight at these orders (the terms that matter lie
    # near alpha * shift); dropping them can only lower the computed divergence by ~1e-100.
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    return float(special.logsumexp(alpha * log_p[keep] + (1 - alpha) * log_q[keep]) / (alpha - 1))


@pytest.mark.parametrize(("sigma", "survivors", "shift"), [(0.6, 3, 1), (0.5, 5, 2), (1.5, 2, 3)])
def test_ddg_bound_holds_against_the_exact_renyi_divergence(
    sigma: float, survivors: int, shift: int
) -> None:
    # One dimension: the exact pmf of a sum of discrete Gaussians, shifted by the sensitivity.
    half = 60
    ks = np.arange(-half, half + 1)
    one = np.exp(-(ks.astype(np.float64) ** 2) / (2 * sigma**2))
    one /= one.sum()
    total = one
    for _ in range(survivors - 1):
        total = np.convolve(total, one)
    total = total[total.size // 2 - half : total.size // 2 + half + 1]
    with np.errstate(divide="ignore"):
        log_q = np.log(total[shift:])
        log_p = np.log(total[:-shift])  # P(x) = Q(x - shift)
    z_eff = gaussian_equivalent_noise_multiplier(
        "discrete_gaussian",
        l2_sensitivity=float(shift),
        dimension=1,
        sigma_site=sigma,
        survivors=survivors,
    )
    for alpha in (1.01, 1.5, 2.0, 3.7, 10.0):
        assert _renyi(log_p, log_q, alpha) <= alpha / (2 * z_eff**2) * (1 + 1e-12)


@pytest.mark.parametrize(("mu_site", "survivors", "shift"), [(0.5, 3, 1), (2.0, 2, 3), (8.0, 4, 5)])
def test_skellam_bound_holds_against_the_exact_renyi_divergence(
    mu_site: float, survivors: int, shift: int
) -> None:
    mu = survivors * mu_site  # Poisson parameter of the sum (variance 2 mu)
    ks = np.arange(-150, 151)
    log_q = stats.skellam.logpmf(ks, mu, mu)
    log_p = stats.skellam.logpmf(ks - shift, mu, mu)
    z_eff = gaussian_equivalent_noise_multiplier(
        "skellam",
        l2_sensitivity=float(shift),
        dimension=1,
        sigma_site=math.sqrt(2 * mu_site),
        survivors=survivors,
    )
    # Fractional orders included: the Gaussian-equivalent must hold for every alpha > 1.
    for alpha in (1.01, 1.5, 2.0, 2.5, 7.0, 20.0):
        assert _renyi(log_p, log_q, alpha) <= alpha / (2 * z_eff**2) * (1 + 1e-12)


# -- encode / decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("mech", MECHS)
def test_threshold_shares_sum_to_the_planned_variance(mech: str) -> None:
    d = 2**17
    cfg = config(mechanism=mech, dimension=d, noise_multiplier=1.5, threshold=3, num_sites=5)
    gamma = cfg.plan.gamma
    rng = np.random.default_rng(21)
    zero = np.zeros(d)
    total = np.zeros(d, dtype=np.uint32)
    for _ in range(cfg.threshold):
        share = encode_site(zero, cfg, rotation_seed=5, rng=rng)
        assert share.values.dtype == np.uint32 and share.values.shape == (d,)
        total += share.values
    noise = lift(total, 32).astype(np.float64)
    target = (cfg.noise_multiplier * cfg.clip / gamma) ** 2
    ratio = noise.var() / target
    tolerance = 6 * math.sqrt(2 / d)  # about 2.3 %
    assert abs(ratio - 1) <= tolerance
    # A per-site noise without the 1/sqrt(threshold) factor (or with it twice) would fail.
    assert abs(ratio * cfg.threshold - 1) > tolerance
    assert abs(ratio / cfg.threshold - 1) > tolerance
    assert abs(noise.mean()) <= 6 * math.sqrt(target / d)
    # After decoding: float-domain noise with std z * c on every coordinate of the sum.
    decoded = decode_sum(total, cfg, rotation_seed=5, survivors=cfg.threshold)
    assert decoded.noise_std == pytest.approx(1.5)
    assert abs(decoded.values.std() / 1.5 - 1) <= tolerance
    assert decoded.near_edge == 0
    # Without wraps the count is binomial with rate ~2 * Phi(-4) = 6e-5: about 8 of 131072.
    assert decoded.beyond_range <= 30


def test_encode_reports_clipping_and_is_reproducible() -> None:
    cfg = config(dimension=300)
    rng_input = np.random.default_rng(0)
    big = rng_input.standard_normal(300) * 5
    small = big / (10 * np.linalg.norm(big))
    a = encode_site(big, cfg, rotation_seed=1, rng=np.random.default_rng(9))
    b = encode_site(big, cfg, rotation_seed=1, rng=np.random.default_rng(9))
    assert (
        a.clipped
        and not encode_site(small, cfg, rotation_seed=1, rng=np.random.default_rng(9)).clipped
    )
    assert np.array_equal(a.values, b.values)
    assert a.rounding_retries >= 0
    original = big.copy()
    encode_site(big, cfg, rotation_seed=1)
    assert np.array_equal(big, original)


def test_encode_and_decode_reject_bad_input() -> None:
    cfg = config(dimension=10)
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidUpdateError, match="length"):
        encode_site(np.zeros(11), cfg, rotation_seed=1, rng=rng)
    with pytest.raises(InvalidUpdateError):
        encode_site(np.array([np.nan] * 10), cfg, rotation_seed=1, rng=rng)
    with pytest.raises(ConfigError, match="rng"):
        encode_site(np.zeros(10), cfg, rotation_seed=1, rng=3)  # type: ignore[arg-type]
    good = encode_site(np.zeros(10), cfg, rotation_seed=1, rng=rng).values
    with pytest.raises(ThresholdError):
        decode_sum(good, cfg, rotation_seed=1, survivors=2)
    with pytest.raises(ConfigError, match="survivors"):
        decode_sum(good, cfg, rotation_seed=1, survivors=9)
    with pytest.raises(InvalidUpdateError, match="uint32"):
        decode_sum(good.astype(np.uint64), cfg, rotation_seed=1, survivors=3)


def test_wrap_proxies_count_coordinates_at_the_edge() -> None:
    cfg = config(dimension=1024)
    total = np.zeros(1024, dtype=np.uint32)
    total[:3] = np.array([2**31 - 1, 2**31, 2**31 + 1], dtype=np.uint32)  # +max, -2**31, -2**31+1
    total[3] = 2**30  # far beyond the planned range, not at the edge
    decoded = decode_sum(total, cfg, rotation_seed=0, survivors=5)
    assert decoded.near_edge == 3
    assert decoded.beyond_range == 4


# -- end to end with secure aggregation -----------------------------------------------------------


def _secagg_round(
    cfg: DistributedDPConfig, updates: dict[int, np.ndarray], seed: int
) -> tuple[np.ndarray, frozenset[int]]:
    rotation_seed = seed * 7919 + 1
    inputs = {
        site: encode_site(
            update, cfg, rotation_seed=rotation_seed, rng=np.random.default_rng([seed, site])
        ).values
        for site, update in updates.items()
    }
    sa_config = make_config(
        sorted(updates),
        vector_length=cfg.padded_dimension,
        bits=cfg.bits,
        threshold=3,
    )
    result = run_round(
        sa_config,
        inputs,
        dropouts={5: Phase.MASKED_INPUT},  # site 5 vanishes after the key exchange
        randbytes=DeterministicRandom(seed + 1),
    )
    assert result.survivors == frozenset({1, 2, 3, 4})
    decoded = decode_sum(
        result.total, cfg, rotation_seed=rotation_seed, survivors=len(result.survivors)
    )
    return decoded.values, result.survivors


def _updates(d: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = {1: 0.6, 2: 0.9, 3: 2.0, 4: 5.0, 5: 1.5}  # sites 3 and 4 exceed the clip norm
    return {site: rng.standard_normal(d) * s / math.sqrt(d) for site, s in scales.items()}


def _clipped(update: np.ndarray, clip: float) -> np.ndarray:
    return update * min(1.0, clip / float(np.linalg.norm(update)))


@pytest.mark.parametrize(("mech", "bits"), [("discrete_gaussian", 32), ("skellam", 64)])
def test_secagg_round_decodes_to_the_noisy_clipped_sum(mech: str, bits: int) -> None:
    d = 3000
    z = 0.05
    cfg = config(mechanism=mech, bits=bits, dimension=d, noise_multiplier=z, threshold=3)
    updates = _updates(d, 1)
    values, survivors = _secagg_round(cfg, updates, seed=2)
    expected = sum(_clipped(updates[s], cfg.clip) for s in survivors)
    error = values - expected
    noise_std = z * cfg.clip * math.sqrt(len(survivors) / cfg.threshold)
    assert abs(error.std() / noise_std - 1) <= 0.1
    assert abs(error.mean()) <= 5 * noise_std / math.sqrt(d)
    # Regressing the result on each site's clipped update: coefficient 1 for the survivors, 0 for
    # the site that dropped out (standard error noise_std / ||update|| <= 0.2).
    for site, update in updates.items():
        u = _clipped(update, cfg.clip)
        coefficient = float(values @ u) / float(u @ u)
        assert abs(coefficient - (1.0 if site in survivors else 0.0)) <= 0.35


@pytest.mark.parametrize("mech", MECHS)
def test_secagg_round_without_noise_is_exact_up_to_rounding(mech: str) -> None:
    d = 3000
    cfg = config(mechanism=mech, dimension=d, noise_multiplier=0.0, threshold=3)
    updates = _updates(d, 3)
    values, survivors = _secagg_round(cfg, updates, seed=4)
    expected = sum(_clipped(updates[s], cfg.clip) for s in survivors)
    gamma = cfg.plan.gamma
    # Each site's rounding error is < 1 unit per rotated coordinate: its L2 norm is below
    # gamma * sqrt(D), and the rotation preserves norms.
    bound = len(survivors) * gamma * math.sqrt(cfg.padded_dimension)
    error = values - expected
    assert float(np.linalg.norm(error)) <= bound
    assert float(np.max(np.abs(error))) <= bound
    assert bound < 1e-4  # i.e. the clipped sum to within the rounding granularity
    assert l2_sensitivity(cfg) > cfg.clip / gamma


@pytest.mark.slow
def test_encode_a_large_update() -> None:
    d = 1_200_000
    cfg = config(num_sites=10, threshold=6, dimension=d)
    update = np.random.default_rng(0).standard_normal(d)
    share = encode_site(update, cfg, rotation_seed=3, rng=np.random.default_rng(1))
    assert share.values.shape == (2**21,) and share.clipped
    decoded = decode_sum(share.values, cfg, rotation_seed=3, survivors=10)
    assert decoded.values.shape == (d,)
