"""Accounting of the distributed discrete Gaussian and Skellam mechanisms (Renyi DP bounds).

Split from :mod:`secure_fl.privacy.distributed` (which re-exports every name here); see its
module docstring for the mechanisms, the theorems and what the bounds cover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError
from secure_fl.privacy.discrete import rounded_l2_bound

if TYPE_CHECKING:
    from secure_fl.privacy.distributed_plan import DistributedDPConfig

MECHANISMS = ("discrete_gaussian", "skellam")


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def l2_sensitivity(cfg: DistributedDPConfig) -> float:
    """L2 sensitivity (integer units) that the privacy analysis uses for one site's share.

    The conditional rounding bound ``rounded_l2_bound(clip / gamma, D, beta)`` that
    :func:`encode_site` enforces, times ``1 + D * 2**-52`` to cover the float64 error of the norm
    check (a relative error below ``D * 2**-53``).
    """
    dim = cfg.padded_dimension
    bound = rounded_l2_bound(cfg.clip / cfg.plan.gamma, dim, cfg.beta)
    return bound * (1.0 + dim * 2.0**-52)


def _check_survivors(cfg: DistributedDPConfig, survivors: object) -> int:
    if (
        isinstance(survivors, bool)
        or not isinstance(survivors, int | np.integer)
        or not 1 <= int(survivors) <= cfg.num_sites
    ):
        raise ConfigError(
            f"survivors must be an integer in [1, num_sites={cfg.num_sites}], got {survivors!r}"
        )
    return int(survivors)


def _ddg_tau(sigma: float, survivors: int) -> float:
    """DDG Theorem 1: ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi**2 sigma**2 k / (k+1))``."""
    if survivors < 2:
        return 0.0
    k = np.arange(1, survivors, dtype=np.float64)
    return 10.0 * float(np.sum(np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1.0))))


def _check_accounting_args(
    mechanism: str, l2: float, dimension: int, sigma: float, survivors: int
) -> None:
    if mechanism not in MECHANISMS:
        raise ConfigError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if not _is_real(l2) or not math.isfinite(l2) or l2 <= 0:
        raise ConfigError(f"l2_sensitivity must be a finite number > 0, got {l2!r}")
    if not _is_int(dimension) or dimension < 1:
        raise ConfigError(f"dimension must be an integer >= 1, got {dimension!r}")
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma <= 0:
        raise ConfigError(f"sigma_site must be a finite number > 0, got {sigma!r}")
    if not _is_int(survivors) or survivors < 1:
        raise ConfigError(f"survivors must be an integer >= 1, got {survivors!r}")
    if mechanism == "discrete_gaussian" and sigma < 0.5:
        raise ConfigError(f"sigma_site must be >= 1/2 for DDG Theorem 1, got {sigma!r}")


def gaussian_equivalent_noise_multiplier(
    mechanism: str,
    *,
    l2_sensitivity: float,
    dimension: int,
    sigma_site: float,
    survivors: int,
) -> float:
    """Gaussian-equivalent noise multiplier of ``survivors`` integer noise shares.

    The sum of ``survivors`` shares (each ``N_Z(0, sigma_site**2)``, or Skellam with variance
    ``sigma_site**2``) added to integer vectors in Z^dimension whose difference has L2 norm <=
    ``l2_sensitivity`` (hence L1 norm <= ``Delta_1 = min(sqrt(d) Delta_2, Delta_2**2)``, the
    coordinates being integers) satisfies ``D_alpha <= alpha / (2 z_eff**2)`` for every order
    ``alpha > 1``:

    * discrete Gaussian -- DDG Theorem 1 (Proposition 14's two terms linear in alpha):
      ``(eps**2 / 2)``-zCDP with ``eps**2 = min(Delta_2**2/(n sigma**2) + 2 tau Delta_1/(sqrt(n)
      sigma) + tau**2 d, (Delta_2/(sqrt(n) sigma) + tau sqrt(d))**2)``, ``tau = 10
      sum_{k<n} exp(-2 pi**2 sigma**2 k/(k+1))``, needs ``sigma >= 1/2``; ``z_eff = 1/eps``.
    * Skellam -- Agarwal et al. 2021, multi-dimensional Skellam RDP, with total variance ``mu = n
      sigma**2``: ``eps(alpha) <= alpha Delta_2**2/(2 mu) + min(((2 alpha - 1) Delta_2**2 + 6
      Delta_1)/(4 mu**2), 3 Delta_1/(2 mu))``. Dividing by alpha, the second term over alpha is at
      most ``min(max((Delta_2**2 + 6 Delta_1)/(4 mu**2), Delta_2**2/(2 mu**2)), 3 Delta_1/(2 mu))``
      for all alpha >= 1, so ``1/(2 z_eff**2)`` = ``Delta_2**2/(2 mu)`` + that.

    Errors: ConfigError for an unknown mechanism or out-of-range argument.
    """
    _check_accounting_args(mechanism, l2_sensitivity, dimension, sigma_site, survivors)
    l2 = float(l2_sensitivity)
    dim = int(dimension)
    sigma = float(sigma_site)
    n = int(survivors)
    l1 = min(math.sqrt(dim) * l2, l2 * l2)
    if mechanism == "discrete_gaussian":
        tau = _ddg_tau(sigma, n)
        scale = math.sqrt(n) * sigma
        u = l2 / scale
        eps_sq = min(
            u * u + 2.0 * tau * l1 / scale + tau * tau * dim, (u + tau * math.sqrt(dim)) ** 2
        )
        return 1.0 / math.sqrt(eps_sq)
    mu = n * sigma * sigma
    extra = min(
        max((l2 * l2 + 6.0 * l1) / (4.0 * mu * mu), l2 * l2 / (2.0 * mu * mu)), 1.5 * l1 / mu
    )
    return 1.0 / math.sqrt(l2 * l2 / mu + 2.0 * extra)


def honest_noise_threshold(
    threshold: int, num_sites: int, corrupt_fraction: float
) -> tuple[int, int]:
    """``(t - c, c)``: the honest survivors distributed noise must be sized for, and the colluders.

    Secure aggregation releases a sum once ``threshold`` (``t``) sites survive; up to ``c =
    ceil(corrupt_fraction * num_sites)`` of them may collude with the server and subtract their
    own noise shares, so only ``t - c`` honest shares are guaranteed to remain in what the
    coalition sees. Sizing the noise for ``t - c`` (``DistributedDPConfig.threshold``) keeps the
    guarantee against the server together with any ``c`` sites.

    Errors: ConfigError naming ``aggregation.options.corrupt_fraction`` / ``threshold`` and
    ``privacy.trust`` when ``t - c < 1`` (no honest noise is guaranteed), or when an argument is
    out of range.
    """
    if not _is_int(num_sites) or num_sites < 1:
        raise ConfigError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    if not _is_int(threshold) or not 1 <= threshold <= num_sites:
        raise ConfigError(
            f"aggregation.options.threshold must be an integer in [1, {num_sites}], got "
            f"{threshold!r}"
        )
    if not _is_real(corrupt_fraction) or not 0.0 <= float(corrupt_fraction) < 1.0:
        raise ConfigError(
            "aggregation.options.corrupt_fraction must be a number in [0, 1), got "
            f"{corrupt_fraction!r}"
        )
    colluders = math.ceil(float(corrupt_fraction) * int(num_sites))
    honest = int(threshold) - colluders
    if honest < 1:
        raise ConfigError(
            f"privacy.trust='distributed' needs at least one honest survivor: threshold={threshold} "
            f"minus colluders c=ceil(aggregation.options.corrupt_fraction={corrupt_fraction:g} x "
            f"{num_sites} sites)={colluders} leaves {honest}; lower "
            "aggregation.options.corrupt_fraction, raise aggregation.options.threshold, or use "
            "privacy.trust='central'"
        )
    return honest, colluders


def effective_noise_multiplier(cfg: DistributedDPConfig, survivors: int) -> float:
    """Gaussian-equivalent noise multiplier of one round of ``cfg`` with ``survivors`` survivors.

    Guarantee: for every order alpha > 1, the round's Renyi divergence between neighbouring
    inputs (one site's update replaced by zero; ``survivors`` honest sites adding noise) is at
    most ``alpha / (2 z_eff**2)``, that of the Gaussian mechanism with multiplier ``z_eff`` (see
    :func:`gaussian_equivalent_noise_multiplier` for the theorems, with sensitivity
    :func:`l2_sensitivity`). At ``threshold`` survivors ``z_eff <= noise_multiplier`` (rounding
    only inflates the sensitivity, and the discrete corrections only add); more survivors add
    noise, so ``z_eff`` grows towards ``noise_multiplier * sqrt(survivors / threshold)``. Returns
    0.0 when ``noise_multiplier`` is 0 (no privacy).

    Valid for RDP (or zCDP) composition without subsampling; see the module docstring for why a
    PRV/PLD accountant or Gaussian subsampling amplification is not covered. For ``"skellam"``
    the bound holds at integer orders only (account with ``PrivacyEvent(...,
    integer_orders=True)``, as the ledger does).

    Errors: ConfigError if ``survivors`` is not an integer in [1, num_sites], or is below
    ``threshold`` (the noise is then smaller than planned and the guarantee does not hold).
    """
    s = _check_survivors(cfg, survivors)
    if s < cfg.threshold:
        raise ConfigError(
            f"survivors={s} is below threshold={cfg.threshold}: the survivors' noise is smaller "
            "than the planned noise and the distributed DP guarantee does not hold"
        )
    if cfg.noise_multiplier == 0.0:
        return 0.0
    return gaussian_equivalent_noise_multiplier(
        cfg.mechanism,
        l2_sensitivity=l2_sensitivity(cfg),
        dimension=cfg.padded_dimension,
        sigma_site=cfg.plan.sigma_site,
        survivors=s,
    )


def distributed_rdp(
    cfg: DistributedDPConfig, survivors: int, orders: Sequence[float]
) -> npt.NDArray[np.float64]:
    """RDP bound ``eps(alpha)`` of one round at each order in ``orders`` (all > 1).

    The raw curves behind :func:`effective_noise_multiplier`, for an RDP accountant that can
    compose arbitrary curves: DDG Proposition 14 (minimum of its three terms, including the one
    not linear in alpha, ``alpha/2 * Delta_2**2/(n sigma**2) + tau d``) or the Skellam bound of
    Agarwal et al., which is stated for integer orders: a fractional order gets the bound at
    ``ceil(alpha)`` (valid, Renyi divergence being non-decreasing in the order). With
    ``noise_multiplier == 0`` every order is ``inf``.

    Errors: as :func:`effective_noise_multiplier`; ConfigError for an order <= 1.
    """
    s = _check_survivors(cfg, survivors)
    if s < cfg.threshold:
        raise ConfigError(
            f"survivors={s} is below threshold={cfg.threshold}: the distributed DP guarantee "
            "does not hold"
        )
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 1.0):
        raise ConfigError("orders must be a 1-D sequence of finite numbers > 1")
    if cfg.noise_multiplier == 0.0:
        return np.full(alphas.shape, np.inf)
    l2 = l2_sensitivity(cfg)
    dim = cfg.padded_dimension
    sigma = cfg.plan.sigma_site
    l1 = min(math.sqrt(dim) * l2, l2 * l2)
    if cfg.mechanism == "discrete_gaussian":
        tau = _ddg_tau(sigma, s)
        scale = math.sqrt(s) * sigma
        u = l2 / scale
        term_1 = alphas / 2.0 * u * u + tau * dim
        term_2 = alphas / 2.0 * (u * u + 2.0 * tau * l1 / scale + tau * tau * dim)
        term_3 = alphas / 2.0 * (u + tau * math.sqrt(dim)) ** 2
        out: npt.NDArray[np.float64] = np.minimum(np.minimum(term_1, term_2), term_3)
        return out
    mu = s * sigma * sigma
    # Agarwal et al. state the Skellam bound for integer orders only; Renyi divergence is
    # non-decreasing in the order, so a fractional order takes the bound at its ceiling.
    ints = np.ceil(alphas)
    extra = np.minimum(((2.0 * ints - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu), 1.5 * l1 / mu)
    curve: npt.NDArray[np.float64] = ints * l2 * l2 / (2.0 * mu) + extra
    return curve


__all__ = [
    "MECHANISMS",
    "distributed_rdp",
    "effective_noise_multiplier",
    "gaussian_equivalent_noise_multiplier",
    "honest_noise_threshold",
    "l2_sensitivity",
]
