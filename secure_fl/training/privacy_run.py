"""Differential privacy in a simulated run: noise calibration, budget checks and the ledger.

For every round the runner asks :class:`PrivacyRound` for the planned mechanism invocations,
which are checked against the budgets (:func:`secure_fl.privacy.check_budget`, refusing the round
before it runs) and written to the ledger as intents; after the round they are confirmed with what
actually ran (optimiser steps, survivors). Unconfirmed intents count as spent, so a crash never
under-counts; a round re-run after a crash is counted again (over-counting, never under-).

* ``level = "sample"``: DP-SGD at each site (:mod:`secure_fl.training.dp_sgd`). Each site's noise
  multiplier is its own: calibrated from the target epsilon for the site's sampling rate
  ``batch_size / n_train`` and its steps over the whole run.
* ``level = "site"``: DP-FedAvg (:mod:`secure_fl.training.dp_fedavg`), one multiplier for all
  sites, calibrated for ``rounds`` releases **without** amplification by site sampling (the server
  sees who takes part): each round, every site gets a record with sampling rate 1 and one step if
  it took part (zero steps otherwise), so ``site_sample_rate < 1`` lowers what a site spends,
  never the per-round epsilon. Distributed noise is sized for the honest survivors ``t - c``.

Every record carries ``params["noise_source"]``: ``"csprng"``, or ``"seeded"`` when the run asked
for ``privacy.reproducible_noise`` (noise predictable from config.json; the audit reports it).
With ``accountant = "prv"`` or ``"pld"`` the multipliers are calibrated with that (tighter)
accountant; distributed runs use RDP (Skellam at integer orders only).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.privacy import (
    LEDGER_FILENAME,
    LedgerEntry,
    PrivacyConfig,
    PrivacyLedger,
    calibrate_noise,
    check_budget,
)
from secure_fl.training.config import ExperimentConfig
from secure_fl.training.dp_fedavg import DPFedAvg
from secure_fl.training.dp_sgd import SampleDP, sample_rate, steps_per_epoch
from secure_fl.training.strategies import Federation, Strategy


def check_privacy_config(config: ExperimentConfig) -> None:
    """Combinations of privacy with the rest of the experiment that cannot work.

    Errors: ConfigError naming the keys.
    """
    p = config.privacy
    if not p.enabled:
        return
    if len(config.strategies) != 1:
        raise ConfigError(
            "with privacy enabled, strategies must name exactly one strategy (each strategy "
            f"would spend the same patients' budget again), got {list(config.strategies)}"
        )
    if p.level == "sample":
        if config.preprocess.samples_per_volume != 1:
            raise ConfigError(
                "privacy.level='sample' protects each patient: set preprocess.samples_per_volume "
                f"= 1 (one patch per case per draw), got {config.preprocess.samples_per_volume}"
            )
        if config.model.norm == "batch":
            raise ConfigError("privacy.level='sample' needs model.norm = 'instance' or 'group'")
        if config.strategies[0] == "fedprox":
            raise ConfigError("fedprox is not supported with privacy.level='sample'")
    if p.level == "site" and config.strategies[0] != "fedavg":
        raise ConfigError(
            f"privacy.level='site' is DP-FedAvg: strategies must be ['fedavg'], got "
            f"{list(config.strategies)}"
        )
    if p.trust == "distributed":
        if p.accountant != "rdp":
            raise ConfigError(
                "privacy.accountant must be 'rdp' with trust='distributed' (the discrete "
                "mechanisms are bounded in RDP; PRV/PLD of the Gaussian would not bound them)"
            )
        if p.bits not in (32, 64):
            raise ConfigError(
                f"privacy.bits must be 32 or 64 with trust='distributed' (the secure-aggregation "
                f"ring), got {p.bits}"
            )
        if config.aggregation.name not in ("secagg", "secagg+"):
            raise ConfigError(
                "trust='distributed' adds noise under secure aggregation: aggregation.name must "
                "be 'secagg' or 'secagg+'"
            )


@dataclass
class PrivacyRound:
    """The privacy bookkeeping of one strategy in one run folder."""

    config: ExperimentConfig
    run_dir: Path
    fed: Federation
    strategy: Strategy
    sample_noise: dict[str, float] = field(default_factory=dict)
    site_noise: float = 0.0
    calibrated_site_noise: float = 0.0
    planned_site_noise: float = 0.0
    ledger: PrivacyLedger | None = None
    resumed: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Per noise group (trainer name at sample level, "" at site level): the factor and the
    round (0-based) of a resume recalibration, recorded in every later entry's params
    (``resume_scale``, ``resume_from_round``) so that the audit can re-derive it."""
    _intents: list[tuple[int, LedgerEntry]] = field(default_factory=list)

    @property
    def privacy(self) -> PrivacyConfig:
        return self.config.privacy

    def open(self) -> None:
        self.ledger = PrivacyLedger(self.run_dir / LEDGER_FILENAME)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    # -- noise ---------------------------------------------------------------------------------

    def _calibrate(self, rate: float, steps: int) -> float:
        p = self.privacy
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        assert p.target_epsilon is not None
        # Skellam's RDP bound holds at integer orders only: calibrate as the ledger will count.
        return calibrate_noise(
            p.target_epsilon,
            rate,
            steps,
            p.delta,
            accountant=p.accountant,
            integer_orders=p.mechanism == "skellam",
        )

    def prepare(self) -> None:
        """Resolve the noise multipliers and hand them to the trainers / the strategy."""
        cfg, p = self.config, self.privacy
        if p.level == "sample":
            trainers = dict(self.fed.sites)
            if self.fed.pooled is not None:
                trainers["pooled"] = self.fed.pooled
            for name, trainer in trainers.items():
                n = trainer.num_train_cases
                q = sample_rate(cfg.train.batch_size, n)
                steps = (
                    cfg.rounds * cfg.train.local_epochs * steps_per_epoch(cfg.train.batch_size, n)
                )
                sigma = self._calibrate(q, steps)
                self.sample_noise[name] = sigma
                trainer.sample_dp = SampleDP(
                    noise_multiplier=sigma, clip=p.clip, reproducible=p.reproducible_noise
                )
        elif p.level == "site":
            # No amplification by site sampling: every round may include a site, at rate 1.
            target = self._calibrate(1.0, cfg.rounds)
            assert isinstance(self.strategy, DPFedAvg)
            self.calibrated_site_noise = target  # the Gaussian(-equivalent) multiplier needed
            self.planned_site_noise = target
            if p.trust == "distributed":
                target = self._distributed_nominal(target)
                # Planned at the threshold: the fewest survivors the round accepts, the least noise.
                self.planned_site_noise = self._effective_at_threshold(target)
            self.site_noise = target
            self.strategy.dp = dataclasses.replace(
                self.strategy.dp, noise_multiplier=target, reproducible=p.reproducible_noise
            )

    def _effective_at_threshold(self, nominal: float) -> float:
        """The Gaussian-equivalent multiplier of distributed noise of nominal multiplier
        ``nominal`` when exactly the ``t - c`` honest survivors it is sized for add noise."""
        from secure_fl.privacy.distributed import DistributedDPConfig, effective_noise_multiplier

        assert isinstance(self.strategy, DPFedAvg)
        n = len(self.fed.names)
        t, _ = self.strategy.noise_threshold(n)  # ConfigError when t - c < 1
        cfg = DistributedDPConfig(
            mechanism=self.privacy.mechanism,
            clip=self.privacy.clip,
            noise_multiplier=nominal,
            threshold=t,
            num_sites=n,
            bits=self.privacy.bits,
            dimension=sum(int(v.size) for v in self.fed.initial.values()),
        )
        return effective_noise_multiplier(cfg, t)

    def _distributed_nominal(self, target: float) -> float:
        """The nominal multiplier whose Gaussian-equivalent value at the threshold meets ``target``."""
        nominal = target
        for _ in range(30):
            eff = self._effective_at_threshold(nominal)
            if eff >= target:
                return nominal
            nominal *= (target / eff) * (1 + 1e-6)
        raise ConfigError("could not size the distributed noise for the target epsilon")

    # -- per round -----------------------------------------------------------------------------

    def planned(self, round_id: int) -> list[LedgerEntry]:
        """What this round will spend, per site, before it runs."""
        cfg, p = self.config, self.privacy
        name = self.strategy.name
        entries: list[LedgerEntry] = []
        if p.level == "sample":
            for trainer_name in self.strategy.training_sites(self.fed, round_id):
                trainer = (
                    self.fed.pooled if trainer_name == "pooled" else self.fed.sites[trainer_name]
                )
                assert trainer is not None
                n = trainer.num_train_cases
                # The pooled (centralised) trainer holds every site's patients: its steps are
                # spent by each site's patients, so they are recorded under each real site.
                owners = self.fed.names if trainer_name == "pooled" else [trainer_name]
                for site in owners:
                    entries.append(
                        LedgerEntry(
                            site=site,
                            round=round_id,
                            level="sample",
                            mechanism="gaussian",
                            noise_multiplier=self.sample_noise[trainer_name],
                            clip=p.clip,
                            sample_rate=sample_rate(cfg.train.batch_size, n),
                            steps=cfg.train.local_epochs * steps_per_epoch(cfg.train.batch_size, n),
                            survivors=None,
                            delta=p.delta,
                            params={
                                **self._params(),
                                **self._resume_params(trainer_name),
                                "trainer": trainer_name,
                                "calibrated_noise_multiplier": self.sample_noise[trainer_name],
                            },
                            strategy=name,
                        )
                    )
        else:
            assert isinstance(self.strategy, DPFedAvg)
            n = len(self.fed.names)
            params = {**self._params(), **self._resume_params("")}
            params["site_sample_rate"] = p.site_sample_rate
            params["amplification"] = False
            if p.trust == "distributed":
                honest, colluders = self.strategy.noise_threshold(n)
                params["threshold"] = self.strategy.threshold(n)
                params["honest_survivors"] = honest
                params["colluders"] = colluders
                params["nominal_noise_multiplier"] = self.site_noise
            # Drawn now, used by the round: only the participants are charged (at rate 1).
            taking_part = set(self.strategy.sampled_sites(self.fed, round_id))
            for site in self.fed.names:
                entries.append(
                    LedgerEntry(
                        site=site,
                        round=round_id,
                        level="site",
                        mechanism=p.mechanism,
                        noise_multiplier=self.planned_site_noise,
                        clip=p.clip,
                        sample_rate=1.0,
                        steps=1 if site in taking_part else 0,
                        survivors=n if p.trust == "distributed" else None,
                        delta=p.delta,
                        params=params,
                        strategy=name,
                    )
                )
        return entries

    def _params(self) -> dict[str, Any]:
        p = self.privacy
        params: dict[str, Any] = {"trust": p.trust, "noise_source": p.noise_source}
        if p.target_epsilon is not None:
            params["target_epsilon"] = p.target_epsilon
        if p.level == "site":
            params["calibrated_noise_multiplier"] = self.calibrated_site_noise
        return params

    def _resume_params(self, group: str) -> dict[str, Any]:
        """The resume recalibration of ``group`` as ledger params (empty when none ran)."""
        if group not in self.resumed:
            return {}
        scale, start = self.resumed[group]
        return {"resume_scale": scale, "resume_from_round": start}

    def before_round(self, round_id: int) -> None:
        """Check the budgets (refusing the round) and record the intents."""
        assert self.ledger is not None
        p = self.privacy
        planned = self.planned(round_id)
        site_budget = p.site_budget
        if p.target_epsilon is not None:  # the target is a budget too (+1e-9: float slack only)
            cap = p.target_epsilon + 1e-9
            site_budget = cap if site_budget is None else min(site_budget, cap)
        check_budget(
            self.ledger,
            planned,
            site_budget=site_budget,
            federation_budget=p.federation_budget,
            delta=p.delta,
            accountant=p.accountant,
        )
        self._intents = [(self.ledger.record_intent(e), e) for e in planned]

    def after_round(self, round_id: int) -> dict[str, Any]:
        """Confirm the intents with what ran; return the metrics row's ``privacy`` entry."""
        assert self.ledger is not None
        p = self.privacy
        for intent_id, entry in self._intents:
            if p.level == "sample":
                trainer_name = entry.params["trainer"]
                trainer = (
                    self.fed.pooled if trainer_name == "pooled" else self.fed.sites[trainer_name]
                )
                assert trainer is not None
                self.ledger.confirm(intent_id, steps=trainer.last_steps)
            else:
                assert isinstance(self.strategy, DPFedAvg)
                survivors = self.strategy.last_round.get("survivors")
                self.ledger.confirm(
                    intent_id,
                    steps=entry.steps,
                    survivors=survivors if p.trust == "distributed" else None,
                )
        self._intents = []
        sites = self.ledger.sites()
        epsilon = {s: self.ledger.spent(s, p.delta, p.accountant) for s in sites}
        return {
            "epsilon": epsilon,
            "max_epsilon": max(epsilon.values(), default=0.0),
            "delta": p.delta,
            "accountant": p.accountant,
            "level": p.level,
            "noise_multiplier": self.site_noise if p.level == "site" else self.sample_noise,
            "ledger_head": self.ledger.head().to_dict(),
        }

    def recalibrate_for_resume(self, start_round: int) -> str | None:
        """Before resuming at ``start_round``, raise the noise of the rounds still to run so that
        every site's epsilon - what the ledger already holds (an interrupted round's unconfirmed
        intents count in full) composed with rounds ``start_round..rounds-1`` - stays within
        ``target_epsilon`` (the noise was calibrated for an uninterrupted run; re-running an
        interrupted round would otherwise overspend). Keeps the noise when it already fits (a
        clean resume then produces the same models). Without a target (a fixed multiplier) only
        the budgets guard the run. A raised noise is recorded in every later entry's params
        (``resume_scale`` and ``resume_from_round``, per trainer at sample level): the audit
        re-derives the factor from the ledger's earlier records with the same
        :func:`~secure_fl.privacy.budget.resume_noise_scale` and credits no more noise than
        that. Returns a line for the log when the noise changed or cannot fit; in the latter
        case the budget check refuses the next round (the run stops there).
        """
        from secure_fl.privacy.budget import planned_event, resume_noise_scale

        if self.ledger is None:
            raise ConfigError("recalibrate_for_resume needs the ledger: call open() first")
        p, rounds = self.privacy, self.config.rounds
        if p.target_epsilon is None or start_round >= rounds or not self.ledger.sites():
            return None
        groups: dict[str, dict[str, list[Any]]] = {}
        for r in range(start_round, rounds):
            for e in self.planned(r):
                key = str(e.params.get("trainer", "")) if p.level == "sample" else ""
                groups.setdefault(key, {}).setdefault(e.site, []).append(planned_event(e))
        history = {s: self.ledger.events_for(s) for s in self.ledger.sites()}
        notes = []
        for key, future in sorted(groups.items()):
            scale = resume_noise_scale(history, future, p.target_epsilon, p.delta, p.accountant)
            if scale is None:
                return (
                    f"resume: the ledger already holds (nearly) the whole target "
                    f"epsilon={p.target_epsilon:g}; no noise lets rounds {start_round + 1}.."
                    f"{rounds} fit, so the budget check will stop the run"
                )
            if scale == 1.0:
                continue
            if p.level == "sample":
                sigma = self.sample_noise[key] * scale
                self.sample_noise[key] = sigma
                trainer = self.fed.pooled if key == "pooled" else self.fed.sites[key]
                if trainer is not None:
                    trainer.sample_dp = SampleDP(
                        noise_multiplier=sigma, clip=p.clip, reproducible=p.reproducible_noise
                    )
            else:
                if not isinstance(self.strategy, DPFedAvg):
                    raise ConfigError("privacy.level='site' needs the DP-FedAvg strategy")
                needed = self.planned_site_noise * scale
                self.calibrated_site_noise = self.planned_site_noise = self.site_noise = needed
                if p.trust == "distributed":
                    self.site_noise = self._distributed_nominal(needed)
                    self.planned_site_noise = self._effective_at_threshold(self.site_noise)
                self.strategy.dp = dataclasses.replace(
                    self.strategy.dp, noise_multiplier=self.site_noise
                )
            self.resumed[key] = (scale, start_round)
            notes.append(f"{key or 'all sites'} x{scale:.4f}")
        if not notes:
            return None
        return (
            f"resume: recalibrated the noise of rounds {start_round + 1}..{rounds} from the "
            f"epsilon already spent, so that target epsilon={p.target_epsilon:g} holds "
            f"({', '.join(notes)})"
        )


def privacy_summary_line(row: dict[str, Any]) -> str:
    """A short text for the progress line."""
    eps = row.get("max_epsilon")
    if eps is None or not math.isfinite(eps):
        return ""
    return f"  ε={eps:.2f} (δ={row['delta']:g})"
