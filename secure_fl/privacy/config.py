"""The differential-privacy section of an experiment configuration (``privacy.*``).

Validated on construction: a wrong type, an unknown name or a value out of range raises
:class:`~secure_fl.errors.ConfigError` naming the dotted field (``privacy.delta``) and what is
allowed. Nothing is adjusted silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.privacy.accounting import ACCOUNTANTS

LEVELS: tuple[str, ...] = ("none", "sample", "site")
TRUST: tuple[str, ...] = ("central", "distributed")
CENTRAL_MECHANISMS: tuple[str, ...] = ("gaussian",)
DISTRIBUTED_MECHANISMS: tuple[str, ...] = ("discrete_gaussian", "skellam")
MECHANISMS: tuple[str, ...] = CENTRAL_MECHANISMS + DISTRIBUTED_MECHANISMS
BITS_RANGE: tuple[int, int] = (8, 64)


@dataclass(frozen=True)
class PrivacyConfig:
    """What differential privacy a run applies, at which level, and with which budget.

    * ``level``: ``"none"``; ``"sample"`` (DP-SGD at every site: protects each patient's records);
      ``"site"`` (DP-FedAvg: protects each institution's whole contribution).
    * ``trust``: ``"central"`` (the server adds the noise) or ``"distributed"`` (sites add
      discrete noise before secure aggregation: distributed DP-FedAvg at site level, "federated
      DP-SGD" at sample level - one global DP-SGD step per round over the pooled cohort,
      :mod:`secure_fl.training.fed_dpsgd`; needs secagg/secagg+ and fedavg).
    * ``mechanism``: ``"gaussian"`` for sample level and central site level; ``"discrete_gaussian"``
      or ``"skellam"`` for distributed trust.
    * ``noise_multiplier`` / ``target_epsilon``: exactly one when ``level != "none"`` (neither
      otherwise). With ``target_epsilon`` the runner calibrates the multiplier for the whole run
      (:func:`secure_fl.privacy.calibrate_noise`) and records it in the ledger. For distributed
      mechanisms the multiplier is the Gaussian-equivalent one of the aggregate noise.
    * ``delta`` in (0, 1); ``clip`` > 0 (per-sample gradient L2 norm at sample level, per-site
      update L2 norm at site level); ``site_sample_rate`` in (0, 1] (site level: Poisson
      probability, drawn from the OS CSPRNG, that a site takes part in a round; no amplification
      is claimed from it - the server sees who takes part - so each site is charged at rate 1 for
      the rounds it joined); ``accountant`` in ``("rdp", "prv", "pld")``;
      ``site_budget`` / ``federation_budget``: epsilon caps (> 0) or None; ``bits`` in [8, 64]:
      the ring size 2^bits of distributed noise.
    * ``reproducible_noise`` (bool, default False): draw the DP noise and the DP sampling from
      generators seeded from the run seed instead of the OS CSPRNG. Anyone holding the run's
      ``config.json`` can then regenerate the noise and subtract it: the run has **no** privacy
      against them. For research reproducibility only; the ledger records ``noise_source =
      "seeded"`` and the audit reports it.

    Errors: :class:`ConfigError` naming ``privacy.<field>`` and the allowed values.
    """

    level: str = "none"
    trust: str = "central"
    mechanism: str = "gaussian"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    site_sample_rate: float = 1.0
    accountant: str = "rdp"
    site_budget: float | None = None
    federation_budget: float | None = None
    bits: int = 32
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        _choice("level", self.level, LEVELS)
        _choice("trust", self.trust, TRUST)
        _choice("mechanism", self.mechanism, MECHANISMS)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        if self.trust == "distributed" and self.level not in ("site", "sample"):
            raise ConfigError(
                "privacy.trust='distributed' needs privacy.level='site' (distributed DP-FedAvg) "
                f"or 'sample' (federated DP-SGD), got level={self.level!r}"
            )
        if self.trust == "distributed" and self.mechanism not in DISTRIBUTED_MECHANISMS:
            raise ConfigError(
                f"privacy.mechanism must be one of {DISTRIBUTED_MECHANISMS} with "
                f"privacy.trust='distributed', got {self.mechanism!r}"
            )
        if self.trust == "central" and self.mechanism not in CENTRAL_MECHANISMS:
            raise ConfigError(
                f"privacy.mechanism must be one of {CENTRAL_MECHANISMS} with privacy.trust="
                f"'central' (discrete mechanisms need trust='distributed'), got {self.mechanism!r}"
            )
        _positive("noise_multiplier", self.noise_multiplier, optional=True)
        _positive("target_epsilon", self.target_epsilon, optional=True)
        if self.level != "none" and (self.noise_multiplier is None) == (
            self.target_epsilon is None
        ):
            raise ConfigError(
                "exactly one of privacy.noise_multiplier and privacy.target_epsilon must be set "
                f"when privacy.level={self.level!r}, got noise_multiplier={self.noise_multiplier!r} "
                f"and target_epsilon={self.target_epsilon!r}"
            )
        if self.level == "none" and (
            self.noise_multiplier is not None or self.target_epsilon is not None
        ):
            raise ConfigError(
                "privacy.noise_multiplier and privacy.target_epsilon must be unset when "
                "privacy.level='none' (set privacy.level to 'sample' or 'site' to apply DP)"
            )
        delta = _real("delta", self.delta)
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta!r}")
        _positive("clip", self.clip, optional=False)
        rate = _real("site_sample_rate", self.site_sample_rate)
        if not 0.0 < rate <= 1.0:
            raise ConfigError(
                f"privacy.site_sample_rate must be in (0, 1], got {self.site_sample_rate!r}"
            )
        _positive("site_budget", self.site_budget, optional=True)
        _positive("federation_budget", self.federation_budget, optional=True)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"privacy.bits must be an integer in [8, 64], got {self.bits!r}")
        if not BITS_RANGE[0] <= self.bits <= BITS_RANGE[1]:
            raise ConfigError(f"privacy.bits must be an integer in [8, 64], got {self.bits!r}")
        if not isinstance(self.reproducible_noise, bool):
            raise ConfigError(
                f"privacy.reproducible_noise must be true or false, got {self.reproducible_noise!r}"
            )
        if self.target_epsilon is not None:
            for name in ("site_budget", "federation_budget"):
                budget = getattr(self, name)
                if budget is not None and self.target_epsilon > budget:
                    raise ConfigError(
                        f"privacy.target_epsilon={self.target_epsilon:g} exceeds privacy.{name}="
                        f"{budget:g}: the run would be refused before it finishes; lower "
                        f"target_epsilon to at most {budget:g}"
                    )
        for name in ("noise_multiplier", "target_epsilon", "delta", "clip", "site_sample_rate"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        for name in ("site_budget", "federation_budget"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))

    @property
    def noise_source(self) -> str:
        """``"seeded"`` with ``reproducible_noise``, else ``"csprng"`` (recorded in the ledger)."""
        return "seeded" if self.reproducible_noise else "csprng"

    @property
    def enabled(self) -> bool:
        """Whether any differential privacy is applied (``level != "none"``)."""
        return self.level != "none"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (the ``"privacy"`` key of a run's ``config.json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyConfig:
        """The inverse of :meth:`to_dict`; unknown keys raise ConfigError naming them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"privacy must be a table/mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) privacy.{', privacy.'.join(unknown)}; allowed: {sorted(known)}"
            )
        return cls(**dict(data))


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"privacy.{name} must be one of {allowed}, got {value!r}")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"privacy.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"privacy.{name} must be finite, got {value!r}")
    return float(value)


def _positive(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if _real(name, value) <= 0.0:
        raise ConfigError(f"privacy.{name} must be a finite number > 0, got {value!r}")
