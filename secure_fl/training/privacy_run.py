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
  sites, calibrated for ``rounds`` Poisson-subsampled releases with rate ``site_sample_rate``.
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
        return calibrate_noise(p.target_epsilon, rate, steps, p.delta, accountant=p.accountant)

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
                trainer.sample_dp = SampleDP(noise_multiplier=sigma, clip=p.clip)
        elif p.level == "site":
            target = self._calibrate(p.site_sample_rate, cfg.rounds)
            assert isinstance(self.strategy, DPFedAvg)
            self.calibrated_site_noise = target  # the Gaussian(-equivalent) multiplier needed
            self.planned_site_noise = target
            if p.trust == "distributed":
                target = self._distributed_nominal(target)
                # Planned at the threshold: the fewest survivors the round accepts, the least noise.
                self.planned_site_noise = self._effective_at_threshold(target)
            self.site_noise = target
            self.strategy.dp = dataclasses.replace(self.strategy.dp, noise_multiplier=target)

    def _effective_at_threshold(self, nominal: float) -> float:
        """The Gaussian-equivalent multiplier of distributed noise of nominal multiplier
        ``nominal`` when exactly the protocol's threshold of sites survive."""
        from secure_fl.privacy.distributed import DistributedDPConfig, effective_noise_multiplier

        assert isinstance(self.strategy, DPFedAvg)
        n = len(self.fed.names)
        t = self.strategy.threshold(n)
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
                                "trainer": trainer_name,
                                "calibrated_noise_multiplier": self.sample_noise[trainer_name],
                            },
                            strategy=name,
                        )
                    )
        else:
            assert isinstance(self.strategy, DPFedAvg)
            n = len(self.fed.names)
            params = self._params()
            if p.trust == "distributed":
                params["threshold"] = self.strategy.threshold(n)
                params["nominal_noise_multiplier"] = self.site_noise
            for site in self.fed.names:
                entries.append(
                    LedgerEntry(
                        site=site,
                        round=round_id,
                        level="site",
                        mechanism=p.mechanism,
                        noise_multiplier=self.planned_site_noise,
                        clip=p.clip,
                        sample_rate=p.site_sample_rate,
                        steps=1,
                        survivors=n if p.trust == "distributed" else None,
                        delta=p.delta,
                        params=params,
                        strategy=name,
                    )
                )
        return entries

    def _params(self) -> dict[str, Any]:
        p = self.privacy
        params: dict[str, Any] = {"trust": p.trust}
        if p.target_epsilon is not None:
            params["target_epsilon"] = p.target_epsilon
        if p.level == "site":
            params["calibrated_noise_multiplier"] = self.calibrated_site_noise
        return params

    def before_round(self, round_id: int) -> None:
        """Check the budgets (refusing the round) and record the intents."""
        assert self.ledger is not None
        p = self.privacy
        planned = self.planned(round_id)
        check_budget(
            self.ledger,
            planned,
            site_budget=p.site_budget,
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
                    intent_id, steps=1, survivors=survivors if p.trust == "distributed" else None
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


def privacy_summary_line(row: dict[str, Any]) -> str:
    """A short text for the progress line."""
    eps = row.get("max_epsilon")
    if eps is None or not math.isfinite(eps):
        return ""
    return f"  ε={eps:.2f} (δ={row['delta']:g})"
