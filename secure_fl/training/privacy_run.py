"""Differential privacy in a simulated run: noise calibration, budget checks and the ledger.

For every round the runner asks :class:`PrivacyRound` for the planned mechanism invocations,
which are checked against the budgets (:func:`secure_fl.privacy.check_budget`, refusing the round
before it runs) and written to the ledger as intents; after the round they are confirmed with what
actually ran (optimiser steps, survivors). Unconfirmed intents count as spent, so a crash never
under-counts; a round re-run after a crash is counted again (over-counting, never under-).

* ``level = "sample"``: DP-SGD at each site (:mod:`secure_fl.training.dp_sgd`). Each site's noise
  multiplier is its own: calibrated from the target epsilon for the site's sampling rate
  ``batch_size / n_train`` and its steps over the whole run.
* ``level = "sample"``, ``trust = "distributed"``: federated DP-SGD
  (:mod:`secure_fl.training.fed_dpsgd`): one multiplier for the pooled cohort, calibrated for
  rate ``batch_size / pooled training cases`` and ``rounds`` steps; each site's patients are
  charged that rate, the effective multiplier and one step per round.
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
)
from secure_fl.privacy.distributed import effective_noise_multiplier
from secure_fl.privacy.session import (
    DistributedSizing,
    SiteLevelSession,
    calibrate_multiplier,
    check_round,
    privacy_row,
)
from secure_fl.training.config import ExperimentConfig
from secure_fl.training.dp_fedavg import DPFedAvg
from secure_fl.training.dp_sgd import SampleDP, sample_rate, steps_per_epoch
from secure_fl.training.privacy_checks import check_privacy_config as check_privacy_config
from secure_fl.training.strategies import Federation, Strategy


@dataclass
class PrivacyRound:
    """The privacy bookkeeping of one strategy in one run folder.

    Site level is delegated to :class:`~secure_fl.privacy.session.SiteLevelSession` (the same
    code the gRPC server runs); sample level (one noise multiplier per trainer) is kept here."""

    config: ExperimentConfig
    run_dir: Path
    fed: Federation
    strategy: Strategy
    sample_noise: dict[str, float] = field(default_factory=dict)
    ledger: PrivacyLedger | None = None
    resumed: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Sample level, per trainer: the factor and the round (0-based) of a resume
    recalibration, recorded in every later entry's params (``resume_scale``,
    ``resume_from_round``) so that the audit can re-derive it."""
    session: SiteLevelSession | None = None
    _intents: list[tuple[int, LedgerEntry]] = field(default_factory=list)

    @property
    def privacy(self) -> PrivacyConfig:
        return self.config.privacy

    # The site-level multipliers, as the runner and the tests read them.
    @property
    def site_noise(self) -> float:
        """The multiplier the site-level noise is sized with (distributed: nominal)."""
        return self.session.nominal if self.session is not None else 0.0

    @property
    def calibrated_site_noise(self) -> float:
        return self.session.calibrated if self.session is not None else 0.0

    @property
    def planned_site_noise(self) -> float:
        return self.session.planned_noise if self.session is not None else 0.0

    def open(self) -> None:
        self.ledger = PrivacyLedger(self.run_dir / LEDGER_FILENAME)
        if self.session is not None:
            self.session.ledger = self.ledger

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    # -- noise ---------------------------------------------------------------------------------

    def _dp_fedavg(self) -> DPFedAvg:
        if not isinstance(self.strategy, DPFedAvg):
            raise ConfigError("privacy.level='site' needs the DP-FedAvg strategy")
        return self.strategy

    def _site_session(self) -> SiteLevelSession:
        strategy = self._dp_fedavg()
        distributed = None
        if self.privacy.trust == "distributed":
            n = len(self.fed.names)
            honest, colluders = strategy.noise_threshold(n)  # ConfigError when t - c < 1
            dimension = sum(int(v.size) for v in self.fed.initial.values())

            def effective(nominal: float) -> float:
                """Gaussian-equivalent multiplier of the noise with nominal multiplier
                ``nominal`` when exactly the ``t - c`` honest shares it is sized for add noise."""
                cfg = dataclasses.replace(
                    strategy.distributed_config(n, dimension), noise_multiplier=nominal
                )
                return effective_noise_multiplier(cfg, honest)

            distributed = DistributedSizing(strategy.threshold(n), honest, colluders, effective)
        return SiteLevelSession(
            self.privacy,
            self.config.rounds,
            tuple(self.fed.names),
            strategy=self.strategy.name,
            distributed=distributed,
            ledger=self.ledger,
        )

    def prepare(self) -> None:
        """Resolve the noise multipliers and hand them to the trainers / the strategy."""
        cfg, p = self.config, self.privacy
        if self.fed_dpsgd:
            self._prepare_fed_dpsgd()
        elif p.level == "sample":
            trainers = dict(self.fed.sites)
            if self.fed.pooled is not None:
                trainers["pooled"] = self.fed.pooled
            for name, trainer in trainers.items():
                n = trainer.num_train_cases
                q = sample_rate(cfg.train.batch_size, n)
                steps = (
                    cfg.rounds * cfg.train.local_epochs * steps_per_epoch(cfg.train.batch_size, n)
                )
                sigma = calibrate_multiplier(p, q, steps)
                self.sample_noise[name] = sigma
                trainer.sample_dp = SampleDP(
                    noise_multiplier=sigma, clip=p.clip, reproducible=p.reproducible_noise
                )
        elif p.level == "site":
            self.session = self._site_session()
            nominal = self.session.calibrate()
            strategy = self._dp_fedavg()
            strategy.dp = dataclasses.replace(
                strategy.dp, noise_multiplier=nominal, reproducible=p.reproducible_noise
            )

    # -- per round -----------------------------------------------------------------------------

    def planned(self, round_id: int) -> list[LedgerEntry]:
        """What this round will spend, per site, before it runs."""
        if self.privacy.level == "site":
            if self.session is None:
                raise ConfigError("call prepare() first")
            # Drawn now, used by the round: only the participants are charged (at rate 1).
            taking_part = set(self._dp_fedavg().sampled_sites(self.fed, round_id))
            return self.session.planned(round_id, taking_part)
        cfg, p = self.config, self.privacy
        if self.fed_dpsgd:
            return self._planned_fed_dpsgd(round_id)
        entries: list[LedgerEntry] = []
        for trainer_name in self.strategy.training_sites(self.fed, round_id):
            trainer = self.fed.pooled if trainer_name == "pooled" else self.fed.sites[trainer_name]
            if trainer is None:
                raise ConfigError(f"no trainer {trainer_name!r}")
            n = trainer.num_train_cases
            # The pooled (centralised) trainer holds every site's patients: its steps are
            # spent by each site's patients, so they are recorded under each real site.
            owners = self.fed.names if trainer_name == "pooled" else [trainer_name]
            params: dict[str, Any] = {"trust": p.trust, "noise_source": p.noise_source}
            if p.target_epsilon is not None:
                params["target_epsilon"] = p.target_epsilon
            params.update(self._resume_params(trainer_name))
            params["trainer"] = trainer_name
            params["calibrated_noise_multiplier"] = self.sample_noise[trainer_name]
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
                        params=params,
                        strategy=self.strategy.name,
                    )
                )
        return entries

    # -- federated DP-SGD (sample level, distributed trust) -------------------------------------

    @property
    def fed_dpsgd(self) -> bool:
        """Whether this run is federated DP-SGD (:mod:`secure_fl.training.fed_dpsgd`)."""
        return self.privacy.level == "sample" and self.privacy.trust == "distributed"

    def _prepare_fed_dpsgd(self) -> None:
        """Federated DP-SGD: ``q = batch_size / pooled training cases``, ``rounds`` steps; the
        target calibrates the EFFECTIVE multiplier (recorded under ``"federation"``), and the
        strategy's nominal one is the smallest whose effective value meets it."""
        from secure_fl.training.fed_dpsgd import (
            FedDPSGD,
            noise_configs,
            nominal_for_effective,
            pooled_sample_rate,
            secagg_threshold,
        )

        cfg, p, strategy, names = self.config, self.privacy, self.strategy, self.fed.names
        if not isinstance(strategy, FedDPSGD):
            raise ConfigError("privacy.level='sample' with trust='distributed' needs FedDPSGD")
        q = pooled_sample_rate(
            cfg.train.batch_size, sum(self.fed.sites[n].num_train_cases for n in names)
        )
        sigma = calibrate_multiplier(p, q, cfg.rounds)
        first = self.fed.sites[names[0]]
        first.initialize()
        dim = sum(int(t.numel()) for t in first.network.parameters() if t.requires_grad)
        t, colluders = secagg_threshold(len(names), cfg.aggregation.options)

        def effective(nominal: float) -> float:
            patient, _ = noise_configs(
                mechanism=p.mechanism,
                clip=p.clip,
                noise_multiplier=nominal,
                bound=p.clip,
                num_sites=len(names),
                threshold=t,
                colluders=colluders,
                dimension=dim,
            )
            return patient.effective_noise_multiplier()

        nominal = nominal_for_effective(sigma, effective)
        strategy.noise_multiplier, strategy.sample_rate = nominal, q
        self.sample_noise["federation"] = effective(nominal)

    def _planned_fed_dpsgd(self, round_id: int) -> list[LedgerEntry]:
        """One step at the pooled rate per round, charged to every site's patients."""
        from secure_fl.training.fed_dpsgd import MODE, FedDPSGD

        p, strategy = self.privacy, self.strategy
        if not isinstance(strategy, FedDPSGD) or "federation" not in self.sample_noise:
            raise ConfigError("call prepare() first")
        params: dict[str, Any] = {
            "trust": p.trust,
            "noise_source": p.noise_source,
            "mode": MODE,
            "nominal_noise_multiplier": strategy.noise_multiplier,
            "calibrated_noise_multiplier": self.sample_noise["federation"],
        }
        if p.target_epsilon is not None:
            params["target_epsilon"] = p.target_epsilon
        entries = []
        for site in self.fed.names:
            entries.append(
                LedgerEntry(
                    site=site,
                    round=round_id,
                    level="sample",
                    mechanism=p.mechanism,
                    noise_multiplier=self.sample_noise["federation"],
                    clip=p.clip,
                    sample_rate=strategy.sample_rate,
                    steps=1,
                    survivors=None,
                    delta=p.delta,
                    params={**params, "trainer": site},
                    strategy=strategy.name,
                )
            )
        return entries

    def _resume_params(self, group: str) -> dict[str, Any]:
        """The resume recalibration of ``group`` as ledger params (empty when none ran)."""
        if group not in self.resumed:
            return {}
        scale, start = self.resumed[group]
        return {"resume_scale": scale, "resume_from_round": start}

    def _open_ledger(self) -> PrivacyLedger:
        if self.ledger is None:
            raise ConfigError("the privacy ledger is not open: call open() first")
        return self.ledger

    def before_round(self, round_id: int) -> None:
        """Check the budgets (refusing the round) and record the intents."""
        ledger = self._open_ledger()
        if self.session is not None:
            taking_part = set(self._dp_fedavg().sampled_sites(self.fed, round_id))
            self.session.before_round(round_id, taking_part)
            return
        self._intents = check_round(ledger, self.planned(round_id), self.privacy)

    def after_round(self, round_id: int) -> dict[str, Any]:
        """Confirm the intents with what ran; return the metrics row's ``privacy`` entry."""
        ledger = self._open_ledger()
        if self.session is not None:
            last = self._dp_fedavg().last_round
            event = last.get("dp_event") or {}
            return self.session.after_round(last.get("survivors"), event.get("noise_multiplier"))
        for intent_id, entry in self._intents:
            trainer_name = entry.params["trainer"]
            trainer = self.fed.pooled if trainer_name == "pooled" else self.fed.sites[trainer_name]
            if trainer is None:
                raise ConfigError(f"no trainer {trainer_name!r}")
            if self.fed_dpsgd:
                event = getattr(self.strategy, "last_round", {}).get("dp_event") or {}
                ledger.confirm(
                    intent_id, steps=trainer.last_steps, noise_multiplier=event["noise_multiplier"]
                )
                continue
            ledger.confirm(intent_id, steps=trainer.last_steps)
        self._intents = []
        return privacy_row(ledger, self.privacy, self.sample_noise)

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

        ledger = self._open_ledger()
        if self.fed_dpsgd and 0 < start_round < self.config.rounds:
            raise ConfigError(
                "resuming a federated DP-SGD run is not supported (its noise is not recalibrated "
                "from the spent epsilon): start a new run folder"
            )
        if self.session is not None:
            strategy = self._dp_fedavg()
            note = self.session.recalibrate_for_resume(
                start_round, lambda r: set(strategy.sampled_sites(self.fed, r))
            )
            strategy.dp = dataclasses.replace(strategy.dp, noise_multiplier=self.session.nominal)
            return note
        p, rounds = self.privacy, self.config.rounds
        if p.target_epsilon is None or start_round >= rounds or not ledger.sites():
            return None
        groups: dict[str, dict[str, list[Any]]] = {}
        for r in range(start_round, rounds):
            for e in self.planned(r):
                key = str(e.params.get("trainer", ""))
                groups.setdefault(key, {}).setdefault(e.site, []).append(planned_event(e))
        history = {s: ledger.events_for(s) for s in ledger.sites()}
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
            sigma = self.sample_noise[key] * scale
            self.sample_noise[key] = sigma
            trainer = self.fed.pooled if key == "pooled" else self.fed.sites[key]
            if trainer is not None:
                trainer.sample_dp = SampleDP(
                    noise_multiplier=sigma, clip=p.clip, reproducible=p.reproducible_noise
                )
            self.resumed[key] = (scale, start_round)
            notes.append(f"{key} x{scale:.4f}")
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
