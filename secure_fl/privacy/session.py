"""Site-level DP bookkeeping of one run: calibration, ledger intents and confirmations, budget stop.

One copy of the site-level (DP-FedAvg) accounting, used by the simulation runner
(:class:`secure_fl.training.privacy_run.PrivacyRound`) and the gRPC server
(:class:`secure_fl.transport.privacy.ServerPrivacy`), so that both write ledgers the audit
(``secure-fl audit``) verifies the same way:

* one noise multiplier for all sites, calibrated from ``target_epsilon`` for ``rounds`` releases
  at sampling rate 1 (no amplification by site sampling: the server sees who takes part), or the
  configured ``noise_multiplier``; distributed noise is sized (its nominal multiplier raised) so
  that its Gaussian-equivalent multiplier at the ``t - c`` honest shares meets that;
* before each round, every site gets an intent (one step if it takes part, else zero; sampling
  rate 1) checked against the budgets (:func:`check_round`, refusing the round before it runs);
  after the round the intents are confirmed (with the survivors, distributed);
* on resume, the remaining rounds' noise is raised so that the target still holds
  (:func:`~secure_fl.privacy.budget.resume_noise_scale`), recorded in every later entry.

Imports numpy and the privacy package only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.privacy.accounting import calibrate_noise
from secure_fl.privacy.budget import check_budget
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.ledger import LEDGER_FILENAME, LedgerEntry, PrivacyLedger


def calibrate_multiplier(privacy: PrivacyConfig, rate: float, steps: int) -> float:
    """The configured ``noise_multiplier``, or the smallest one meeting ``target_epsilon`` for
    ``steps`` steps at sampling rate ``rate`` with the configured accountant (Skellam: at integer
    orders, as the ledger counts). Errors: ConfigError from the calibration."""
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    if privacy.target_epsilon is None:
        raise ConfigError("privacy needs noise_multiplier or target_epsilon")
    return calibrate_noise(
        privacy.target_epsilon,
        rate,
        steps,
        privacy.delta,
        accountant=privacy.accountant,
        integer_orders=privacy.mechanism == "skellam",
    )


def check_round(
    ledger: PrivacyLedger, planned: Sequence[LedgerEntry], privacy: PrivacyConfig
) -> list[tuple[int, LedgerEntry]]:
    """Check ``planned`` against the budgets (``target_epsilon`` is a budget too, +1e-9 float
    slack) and record the intents; returns ``(intent id, entry)`` pairs to confirm.

    Errors: BudgetExceededError before anything is recorded (the round must not run);
    LedgerIntegrityError for a tampered ledger."""
    site_budget = privacy.site_budget
    if privacy.target_epsilon is not None:
        cap = privacy.target_epsilon + 1e-9
        site_budget = cap if site_budget is None else min(site_budget, cap)
    check_budget(
        ledger,
        planned,
        site_budget=site_budget,
        federation_budget=privacy.federation_budget,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )
    return [(ledger.record_intent(e), e) for e in planned]


def privacy_row(ledger: PrivacyLedger, privacy: PrivacyConfig, noise: Any) -> dict[str, Any]:
    """The ``privacy`` entry of a metrics row: every site's epsilon from the ledger (at the
    configuration's delta and accountant), their maximum and the ledger head (the audit's
    anchor)."""
    epsilon = {s: ledger.spent(s, privacy.delta, privacy.accountant) for s in ledger.sites()}
    return {
        "epsilon": epsilon,
        "max_epsilon": max(epsilon.values(), default=0.0),
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        "level": privacy.level,
        "noise_multiplier": noise,
        "ledger_head": ledger.head().to_dict(),
    }


@dataclass(frozen=True)
class DistributedSizing:
    """How a run's distributed noise is sized: the SecAgg ``threshold`` t, the ``honest``
    shares h = t - c it must hold with, the ``colluders`` c, and ``effective(z)``: the
    Gaussian-equivalent multiplier at h honest shares of noise of nominal multiplier z."""

    threshold: int
    honest: int
    colluders: int
    effective: Callable[[float], float] = field(repr=False, compare=False)

    def nominal_for(self, target: float) -> float:
        """The nominal multiplier whose Gaussian-equivalent value at ``honest`` meets ``target``.
        Errors: ConfigError when 30 multiplicative steps do not reach it."""
        nominal = target
        for _ in range(30):
            eff = self.effective(nominal)
            if eff >= target:
                return nominal
            nominal *= (target / eff) * (1 + 1e-6)
        raise ConfigError("could not size the distributed noise for the target epsilon")


@dataclass
class SiteLevelSession:
    """The site-level DP bookkeeping of one run over ``sites`` for ``rounds`` rounds (module
    docstring). ``nominal`` is the multiplier the noise is sized with (the strategy / server
    applies it), ``planned_noise`` the Gaussian-equivalent one the ledger records,
    ``calibrated`` the one the target needs. Call :meth:`open`, :meth:`calibrate`, then per
    round :meth:`before_round` and :meth:`after_round`."""

    privacy: PrivacyConfig
    rounds: int
    sites: tuple[str, ...]
    strategy: str = "fedavg"
    distributed: DistributedSizing | None = None
    ledger: PrivacyLedger | None = None
    nominal: float = 0.0
    calibrated: float = 0.0
    planned_noise: float = 0.0
    resumed: tuple[float, int] | None = None
    """The factor and 0-based round of a resume recalibration (recorded in later entries)."""
    _intents: list[tuple[int, LedgerEntry]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.privacy.level != "site":
            raise ConfigError(f"privacy.level must be 'site' here, got {self.privacy.level!r}")
        if (self.privacy.trust == "distributed") != (self.distributed is not None):
            raise ConfigError(
                "distributed sizing is needed exactly when privacy.trust is distributed"
            )
        self.sites = tuple(self.sites)

    def open(self, run_dir: Path) -> PrivacyLedger:
        """Open (or create) the ledger in ``run_dir``."""
        self.ledger = PrivacyLedger(Path(run_dir) / LEDGER_FILENAME)
        return self.ledger

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    def _ledger(self) -> PrivacyLedger:
        if self.ledger is None:
            raise ConfigError("the privacy ledger is not open: call open() first")
        return self.ledger

    def calibrate(self) -> float:
        """Resolve the multipliers (module docstring); returns :attr:`nominal`."""
        target = calibrate_multiplier(self.privacy, 1.0, self.rounds)
        self.calibrated = self.planned_noise = self.nominal = target
        if self.distributed is not None:
            self.nominal = self.distributed.nominal_for(target)
            # Planned at the threshold: the fewest honest shares the round accepts, least noise.
            self.planned_noise = self.distributed.effective(self.nominal)
        return self.nominal

    def params(self) -> dict[str, Any]:
        """The raw parameters every entry of this run carries."""
        p = self.privacy
        params: dict[str, Any] = {"trust": p.trust, "noise_source": p.noise_source}
        if p.target_epsilon is not None:
            params["target_epsilon"] = p.target_epsilon
        params["calibrated_noise_multiplier"] = self.calibrated
        if self.resumed is not None:
            params["resume_scale"], params["resume_from_round"] = self.resumed
        params["site_sample_rate"] = p.site_sample_rate
        params["amplification"] = False
        if self.distributed is not None:
            params["threshold"] = self.distributed.threshold
            params["honest_survivors"] = self.distributed.honest
            params["colluders"] = self.distributed.colluders
            params["nominal_noise_multiplier"] = self.nominal
        return params

    def planned(self, round_id: int, taking_part: Collection[str]) -> list[LedgerEntry]:
        """One entry per site for 0-based ``round_id``: one step if it takes part, else zero,
        at sampling rate 1 with the planned Gaussian-equivalent multiplier."""
        params = self.params()
        n = len(self.sites)
        return [
            LedgerEntry(
                site=site,
                round=round_id,
                level="site",
                mechanism=self.privacy.mechanism,
                noise_multiplier=self.planned_noise,
                clip=self.privacy.clip,
                sample_rate=1.0,
                steps=1 if site in taking_part else 0,
                survivors=n if self.distributed is not None else None,
                delta=self.privacy.delta,
                params=params,
                strategy=self.strategy,
            )
            for site in self.sites
        ]

    def before_round(self, round_id: int, taking_part: Collection[str]) -> None:
        """Check the budgets (BudgetExceededError: the round must not run) and record intents."""
        self._intents = check_round(
            self._ledger(), self.planned(round_id, taking_part), self.privacy
        )

    def after_round(
        self, survivors: int | None, noise_multiplier: float | None = None
    ) -> dict[str, Any]:
        """Confirm the round's intents (``survivors``: sites in the sum, distributed only;
        ``noise_multiplier``: the Gaussian-equivalent multiplier the DP wrapper reports it
        applied, its ``DPEvent``, when known: the ledger never accounts more noise than that);
        returns the metrics row's ``privacy`` entry."""
        ledger = self._ledger()
        for intent_id, entry in self._intents:
            ledger.confirm(
                intent_id,
                steps=entry.steps,
                survivors=survivors if self.distributed is not None else None,
                noise_multiplier=noise_multiplier,
            )
        self._intents = []
        return privacy_row(ledger, self.privacy, self.nominal)

    def recalibrate_for_resume(
        self, start_round: int, taking_part: Callable[[int], Collection[str]]
    ) -> str | None:
        """Before resuming at 0-based ``start_round``, raise the remaining rounds' noise so that
        every site's epsilon (the ledger's records, unconfirmed intents in full, composed with
        rounds ``start_round..rounds-1``) stays within ``target_epsilon``; a clean resume keeps
        the noise. Returns a line for the log when the noise changed or cannot fit (the budget
        check then refuses the next round); None otherwise or without a target."""
        from secure_fl.privacy.budget import planned_event, resume_noise_scale

        ledger, p = self._ledger(), self.privacy
        if p.target_epsilon is None or start_round >= self.rounds or not ledger.sites():
            return None
        future: dict[str, list[Any]] = {}
        for r in range(start_round, self.rounds):
            for e in self.planned(r, taking_part(r)):
                future.setdefault(e.site, []).append(planned_event(e))
        history = {s: ledger.events_for(s) for s in ledger.sites()}
        scale = resume_noise_scale(history, future, p.target_epsilon, p.delta, p.accountant)
        if scale is None:
            return (
                f"resume: the ledger already holds (nearly) the whole target epsilon="
                f"{p.target_epsilon:g}; no noise lets rounds {start_round + 1}..{self.rounds} "
                "fit, so the budget check will stop the run"
            )
        if scale == 1.0:
            return None
        needed = self.planned_noise * scale
        self.calibrated = self.planned_noise = self.nominal = needed
        if self.distributed is not None:
            self.nominal = self.distributed.nominal_for(needed)
            self.planned_noise = self.distributed.effective(self.nominal)
        self.resumed = (scale, start_round)
        return (
            f"resume: recalibrated the noise of rounds {start_round + 1}..{self.rounds} from the "
            f"epsilon already spent, so that target epsilon={p.target_epsilon:g} holds "
            f"(all sites x{scale:.4f})"
        )


__all__ = [
    "DistributedSizing",
    "SiteLevelSession",
    "calibrate_multiplier",
    "check_round",
    "privacy_row",
]
