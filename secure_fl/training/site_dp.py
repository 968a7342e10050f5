"""Sample-level DP-SGD that a :class:`~secure_fl.training.trainer.SiteTrainer` runs by itself.

When another framework drives the trainer (MONAI FL, NVIDIA FLARE: ``SiteTrainer(...,
privacy=PrivacyConfig(level="sample", ...))`` then ``train``/``get_weights`` directly), nobody else
switches DP-SGD on: :class:`TrainerDP` does it from the trainer's own ``privacy`` argument. It
resolves the noise multiplier (given, or calibrated once so that ``target_epsilon`` holds after the
run's ``rounds`` rounds of ``local_epochs`` epochs, RDP/PRV/PLD as ``privacy.accountant`` says),
refuses a round that would take the site's patients over ``target_epsilon`` or ``site_budget``
(BudgetExceededError before anything runs, e.g. when a per-round ``local_epochs`` asks for more
steps than planned), and records what every round spent (:class:`DPRound`) so that the caller
can write it into its ledger (:meth:`TrainerDP.events`, :meth:`TrainerDP.planned_event` for the
intent before the round).

The simulated runner keeps its own ledger and sets ``SiteTrainer.sample_dp`` itself
(:mod:`secure_fl.training.privacy_run`); an explicitly set ``sample_dp`` wins over this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.privacy.accounting import PrivacyEvent, calibrate_noise, epsilon_of_events
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.training.dp_sgd import SampleDP, sample_rate, steps_per_epoch


@dataclass(frozen=True)
class DPRound:
    """What one DP-SGD round at this site spent: its 0-based ``round``, the optimiser ``steps``
    (Poisson draws, empty ones included), ``noise_multiplier``, ``sample_rate`` ``q``, the
    per-case ``clip`` and where the noise came from (``"csprng"`` or ``"seeded"``)."""

    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    clip: float
    noise_source: str

    def event(self) -> PrivacyEvent:
        """The accountant's view of the round (Poisson-subsampled Gaussian, ``steps`` times)."""
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)


class TrainerDP:
    """The DP-SGD state of one trainer driven directly (module docstring).

    Errors (constructor): ConfigError when ``privacy.level`` is not ``"sample"`` or
    ``samples_per_volume`` is not 1 (the privacy unit is one case: one patch per draw).
    """

    def __init__(self, privacy: PrivacyConfig, *, samples_per_volume: int) -> None:
        if privacy.level != "sample":
            raise ConfigError(
                f"privacy.level must be 'sample' for DP-SGD in the trainer, got {privacy.level!r}"
            )
        if samples_per_volume != 1:
            raise ConfigError(
                "sample-level DP needs one patch per case per draw: set "
                f"preprocess.samples_per_volume = 1, got {samples_per_volume}"
            )
        self.privacy = privacy
        self.rounds_log: list[DPRound] = []
        self._sigma: float | None = privacy.noise_multiplier

    def settings(self, *, batch_size: int, n_cases: int, epochs: int, rounds: int) -> SampleDP:
        """The DP-SGD settings of the next round; with ``target_epsilon`` the noise is calibrated
        on the first call for ``rounds`` rounds of ``epochs`` epochs over ``n_cases`` cases.
        Errors: ConfigError when the target is unreachable or an argument is out of range."""
        if self._sigma is None:
            p = self.privacy
            if p.target_epsilon is None:  # pragma: no cover - PrivacyConfig guarantees one
                raise ConfigError("privacy: one of noise_multiplier and target_epsilon is needed")
            q = sample_rate(batch_size, n_cases)
            steps = rounds * epochs * steps_per_epoch(batch_size, n_cases)
            self._sigma = calibrate_noise(p.target_epsilon, q, steps, p.delta, p.accountant)
        return SampleDP(
            noise_multiplier=self._sigma,
            clip=self.privacy.clip,
            reproducible=self.privacy.reproducible_noise,
        )

    def planned_event(self, *, batch_size: int, n_cases: int, epochs: int) -> PrivacyEvent:
        """What the next round will spend (for a ledger intent before it runs); needs the noise
        resolved (:meth:`settings`)."""
        if self._sigma is None:
            raise ConfigError("planned_event: resolve the noise first (settings())")
        q = sample_rate(batch_size, n_cases)
        return PrivacyEvent(self._sigma, q, epochs * steps_per_epoch(batch_size, n_cases))

    def check_budget(self, planned: PrivacyEvent) -> None:
        """Refuse the round (BudgetExceededError, before it runs) when what was spent plus
        ``planned`` exceeds ``target_epsilon`` or ``site_budget`` at ``privacy.delta``; the
        message gives spent, projected, budget and remaining epsilon."""
        p = self.privacy
        caps = [b for b in (p.target_epsilon, p.site_budget) if b is not None]
        if not caps:
            return
        budget = min(caps)
        spent = self.epsilon()
        projected = epsilon_of_events([*self.events(), planned], p.delta, p.accountant)
        if projected > budget + 1e-9:
            raise BudgetExceededError(
                f"this site's patients: spent ε={spent:.3f}, this round would bring it to "
                f"{projected:.3f}, budget {budget:.3f} (delta={p.delta:g}), remaining "
                f"{max(budget - spent, 0.0):.3f}"
            )

    def record(self, round_id: int, steps: int, sample_q: float, settings: SampleDP) -> DPRound:
        """Append what a round ran; returns the record."""
        entry = DPRound(
            round=round_id,
            steps=steps,
            noise_multiplier=settings.noise_multiplier,
            sample_rate=sample_q,
            clip=settings.clip,
            noise_source="seeded" if settings.reproducible else "csprng",
        )
        self.rounds_log.append(entry)
        return entry

    def events(self) -> list[PrivacyEvent]:
        """Every recorded round as an accountant event, in order."""
        return [r.event() for r in self.rounds_log]

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far by this site's patients at ``delta`` (default ``privacy.delta``),
        with ``privacy.accountant``; 0.0 before the first round."""
        p = self.privacy
        return epsilon_of_events(self.events(), p.delta if delta is None else delta, p.accountant)
