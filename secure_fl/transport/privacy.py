"""Differential privacy over gRPC: the server's ledger and noise, the site's privacy floor.

Site level (DP-FedAvg) only, over SecAgg / SecAgg+; the bookkeeping is the simulation runner's
(:class:`secure_fl.privacy.session.SiteLevelSession`), so the server's run folder (its
``state_dir``) is audited by ``secure-fl audit STATE_DIR`` exactly like a simulated run:

* ``config.json`` -- ``privacy`` (:meth:`PrivacyConfig.to_dict`), ``rounds``, ``strategies``
  (``["fedavg"]``), the federation, the roster and the aggregation; written once, and a restart
  with a different privacy section or roster is refused (ConfigError);
* ``privacy_ledger.sqlite`` (+ ``.head``) -- before each round every roster site gets an intent
  (one step at sampling rate 1: the server charges every site every round, whether it joins or
  not: an over-count, never an under-count), checked against ``target_epsilon`` and the budgets;
  after the round it is confirmed;
* ``metrics.jsonl`` -- one row per finished round (numbered from 1) with every site's epsilon and
  the ledger head; ``stopped.json`` -- when a budget refused a round (which one, and why).

Trust ``central``: every site clips its update to ``clip`` in L2 (the server sends the bound in
``SecAggSetup.distributed_dp_json`` as ``{"kind": "central_clip/v1", "clip": c}``, bound into
the round's keys) and the server adds Gaussian noise to the decoded mean: std ``noise_multiplier
* clip * max(w) / sum(w)`` over the survivors' weights, from the OS CSPRNG. The server sees the
exact mean first (it is trusted with the noise); everyone who receives the model is held to
epsilon. Trust ``distributed``: the server sends :class:`~secure_fl.privacy.codec_noise.
CodecNoiseConfig` JSON; every site checks it against its own floor (:class:`SitePrivacy`) and adds
its noise share to its encoded integers before masking; the server adds nothing.

Guarantees and refusals: ``privacy.level = "sample"`` (DP-SGD is the sites' own job),
``reproducible_noise``, ``site_sample_rate < 1``, a protocol other than SecAgg / SecAgg+, and
(distributed) an accountant other than RDP or ``min_sites`` below the noise threshold are refused
when the server starts (ConfigError).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.atomic import atomic_write
from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.privacy.codec_noise import CodecNoiseConfig
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.distributed import honest_noise_threshold
from secure_fl.privacy.session import DistributedSizing, SiteLevelSession
from secure_fl.transport.privacy_site import CENTRAL_CLIP_KIND, CentralClip, SitePrivacy

STRATEGY = "fedavg"
CONFIG_FILENAME = "config.json"
log = logging.getLogger("secure_fl.transport.privacy")
METRICS_FILENAME = "metrics.jsonl"
STOPPED_FILENAME = "stopped.json"


def _secagg_threshold(settings: Any, num_sites: int) -> int:
    """The SecAgg threshold a round of ``num_sites`` gets from ``settings`` (as the plan
    computes it)."""
    from secure_fl.secagg import make_config

    return int(
        make_config(
            list(range(1, num_sites + 1)),
            vector_length=1,
            bits=32,
            protocol=settings.protocol,
            threshold=settings.threshold,
            k=settings.k,
            dropout_rate=settings.dropout_rate,
            corrupt_fraction=settings.corrupt_fraction,
        ).threshold
    )


class ServerPrivacy:
    """The server's privacy layer (module docstring). Built by :meth:`from_config`.

    ``aggregation``: the server's aggregation settings (``protocol``, ``threshold``, ``k``,
    ``dropout_rate``, ``corrupt_fraction``); ``dimension``: the model's length (vector length of
    every round); ``min_sites``: the fewest participants a round may start with; ``kind``: what wrote the run
    folder, recorded in its ``config.json`` (``grpc-server``, ``flower-server``).

    Errors (constructor): ConfigError for a configuration it cannot serve (module docstring), or
    a run folder written by another configuration.
    """

    def __init__(
        self,
        privacy: PrivacyConfig,
        run_dir: Path,
        *,
        rounds: int,
        roster: Sequence[str],
        dimension: int,
        aggregation: Any,
        min_sites: int,
        federation: str = "",
        kind: str = "grpc-server",
    ) -> None:
        self.privacy = privacy
        self.kind = kind
        self.run_dir = Path(run_dir)
        self.rounds = int(rounds)
        self.roster = tuple(roster)
        self.dimension = int(dimension)
        self.aggregation = aggregation
        check_served(privacy, aggregation)
        self.colluders = 0
        sizing = None
        if privacy.trust == "distributed":
            n = len(self.roster)
            t = _secagg_threshold(aggregation, n)
            honest, self.colluders = honest_noise_threshold(t, n, aggregation.corrupt_fraction)
            if min_sites < t:
                raise ConfigError(
                    f"min_sites={min_sites} is below the SecAgg threshold t={t} the distributed "
                    f"noise is sized for (t - c = {honest} honest shares): set min_sites >= {t}"
                )
            sizing = DistributedSizing(t, honest, self.colluders, self._effective)
        self.session = SiteLevelSession(
            privacy, self.rounds, self.roster, strategy=STRATEGY, distributed=sizing
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config(federation)
        self.session.open(self.run_dir)
        self.session.calibrate()
        self._pending: int | None = None  # the round whose intents are recorded, not confirmed
        self._participants: dict[int, str] = {}  # the participants of the pending round
        self._resumed = False
        self.last_event: dict[str, Any] | None = None
        self.resume_note: str | None = None
        """The log line of a resume recalibration (None when the noise was kept)."""

    @classmethod
    def from_config(cls, config: Any, run_dir: Path) -> ServerPrivacy:
        """From a :class:`~secure_fl.transport.config.ServerConfig` whose ``privacy`` is set;
        the run folder is ``run_dir`` (the server passes its ``state_dir``)."""
        from secure_fl.transport.rounds import initial_model, model_size

        if config.privacy is None:
            raise ConfigError("ServerPrivacy needs ServerConfig.privacy")
        return cls(
            config.privacy,
            run_dir,
            rounds=config.rounds,
            roster=[e.name for e in config.roster],
            dimension=model_size(initial_model(config.model)),
            aggregation=config.aggregation,
            min_sites=config.min_sites,
            federation=config.federation,
        )

    # -- configuration ---------------------------------------------------------------------------

    def _effective(self, nominal: float) -> float:
        return self._noise_config(nominal, len(self.roster)).effective_noise_multiplier()

    def _noise_config(self, nominal: float, num_sites: int) -> CodecNoiseConfig:
        sizing = self.session.distributed
        if sizing is None:
            raise ConfigError("no distributed noise in a central-trust run")
        return CodecNoiseConfig(
            mechanism=self.privacy.mechanism,
            clip=self.privacy.clip,
            noise_multiplier=nominal,
            honest_threshold=sizing.honest,
            threshold=sizing.threshold,
            colluders=sizing.colluders,
            num_sites=num_sites,
            dimension=self.dimension,
        )

    def _write_config(self, federation: str) -> None:
        agg = self.aggregation
        config = {
            "kind": self.kind,
            "federation": federation,
            "privacy": self.privacy.to_dict(),
            "rounds": self.rounds,
            "strategies": [STRATEGY],
            "roster": list(self.roster),
            "aggregation": {
                "protocol": agg.protocol,
                "threshold": agg.threshold,
                "corrupt_fraction": agg.corrupt_fraction,
                "dropout_rate": agg.dropout_rate,
            },
            "dimension": self.dimension,
        }
        path = self.run_dir / CONFIG_FILENAME
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path} is unreadable: {exc}") from exc
            same = ("privacy", "roster", "aggregation", "dimension", "strategies")
            if not isinstance(old, dict) or any(old.get(k) != config[k] for k in same):
                raise ConfigError(
                    f"{path} was written by another configuration (privacy, roster, aggregation "
                    "or model differ): a run's ledger cannot be continued under other settings; "
                    "use a fresh state_dir"
                )
            if old.get("rounds") == self.rounds:
                return
        atomic_write(path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def l2_clip(self) -> float:
        """The L2 bound every site's update must be clipped to (``privacy.clip``)."""
        return self.privacy.clip

    # -- rounds ----------------------------------------------------------------------------------

    def before_round(self, round_index: int, participants: Mapping[int, str]) -> str:
        """Before round ``round_index`` (0-based) with ``participants`` (site id -> name):
        recalibrate once after a restart, check the budgets and record the intents (a retried
        attempt of the same round reuses them). Returns the JSON for
        ``SecAggSetup.distributed_dp_json`` (bound into the round).

        Errors: BudgetExceededError (``stopped.json`` is written; the round must not run);
        ConfigError for a participant off the roster or fewer participants than the noise
        threshold."""
        unknown = sorted(set(participants.values()) - set(self.roster))
        if unknown:
            raise ConfigError(f"participants {unknown} are not on the roster")
        self._participants = dict(participants)
        if not self._resumed:
            self._resumed = True
            self.resume_note = self.session.recalibrate_for_resume(
                round_index, lambda _: self.roster
            )
            if self.resume_note:
                log.warning("%s", self.resume_note)
        if self._pending != round_index:
            try:
                self.session.before_round(round_index, self.roster)
            except BudgetExceededError as exc:
                stop = {
                    "reason": "privacy_budget",
                    "strategy": STRATEGY,
                    "round": round_index + 1,
                    "message": str(exc),
                }
                atomic_write(self.run_dir / STOPPED_FILENAME, json.dumps(stop, indent=2) + "\n")
                raise
            self._pending = round_index
        if self.session.distributed is None:
            return CentralClip(self.privacy.clip).to_json()
        if len(participants) < self.session.distributed.threshold:
            raise ConfigError(
                f"{len(participants)} participants are fewer than the noise threshold "
                f"t={self.session.distributed.threshold}"
            )
        return self._noise_config(self.session.nominal, len(participants)).to_json()

    def apply(
        self,
        round_index: int,
        mean: np.ndarray,
        survivors: Mapping[int, str],
        weights: Mapping[int, float],
        record: dict[str, Any],
    ) -> np.ndarray:
        """After round ``round_index``: central trust adds the Gaussian noise to ``mean`` (the
        survivors' weighted mean; ``weights`` the reported weights by site id); then confirms
        the intents, appends the metrics row and adds ``record["privacy"]``. Returns the mean to
        release. Errors: ConfigError when no intents are pending for this round, or a survivor
        is not among the participants given to :meth:`before_round` for it (id and name: a
        survivor the ledger did not charge)."""
        if self._pending != round_index:
            raise ConfigError(f"round {round_index + 1} has no recorded privacy intents")
        strangers = sorted(
            f"{sid}={name}"
            for sid, name in survivors.items()
            if self._participants.get(sid) != name or name not in self.roster
        )
        if strangers:
            raise ConfigError(
                f"survivors {strangers} of round {round_index + 1} are not among its "
                f"participants {sorted(self._participants.values())} on the roster"
            )
        from secure_fl.aggregators.dp import DPEvent

        session = self.session
        noised = np.asarray(mean, dtype=np.float64)
        sizing = session.distributed
        clip = self.privacy.clip
        if sizing is None:
            surviving = [float(weights[s]) for s in survivors if s in weights]
            if len(surviving) != len(survivors) or not surviving:
                raise ConfigError("apply needs the reported weight of every survivor")
            std = session.nominal * clip * max(surviving) / sum(surviving)
            gen = np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
            noised = noised + gen.normal(0.0, 1.0, noised.shape) * std
            noise_std = session.nominal * clip
        else:
            # the sites' shares: std z * clip * w_max on the weighted sum, for `honest` shares
            w = [float(weights[s]) for s in survivors if s in weights] or [1.0]
            noise_std = (
                session.nominal * clip * max(w) / sum(w) * math.sqrt(len(survivors) / sizing.honest)
            )
        event = DPEvent(
            mechanism=self.privacy.mechanism,
            trust=self.privacy.trust,
            noise_multiplier=session.planned_noise,
            nominal_noise_multiplier=session.nominal,
            clip=clip,
            noise_std=noise_std,
            survivors=len(survivors),
            noise_source="csprng",
            threshold=sizing.threshold if sizing is not None else None,
            honest_survivors=sizing.honest if sizing is not None else None,
            colluders=sizing.colluders if sizing is not None else None,
        ).to_dict()
        row = session.after_round(len(survivors), event["noise_multiplier"])
        self._pending = None
        self.last_event = event
        metrics = {
            "round": round_index + 1,
            "strategy": STRATEGY,
            "survivors": sorted(survivors.values()),
            "dp_event": event,
            "privacy": row,
        }
        with open(self.run_dir / METRICS_FILENAME, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        record["privacy"] = {
            "max_epsilon": row["max_epsilon"],
            "delta": row["delta"],
            "ledger_head": row["ledger_head"],
            "dp_event": event,
        }
        return noised

    def epsilon(self) -> float:
        """The largest epsilon any site has spent so far (the ledger's, unconfirmed included)."""
        ledger = self.session._ledger()
        p = self.privacy
        return max((ledger.spent(s, p.delta, p.accountant) for s in ledger.sites()), default=0.0)

    def finish(self, rounds_completed: int) -> None:
        """Close the ledger (``rounds_completed`` is informative)."""
        del rounds_completed
        self.session.close()


def check_served(privacy: PrivacyConfig, aggregation: Any) -> None:
    """Refuse (ConfigError naming the field) privacy the gRPC server cannot serve (module
    docstring); ``aggregation`` needs ``protocol``."""
    if privacy.level != "site":
        raise ConfigError(
            f"privacy.level must be 'site' for the gRPC server (DP-FedAvg), got "
            f"{privacy.level!r}: sample-level DP-SGD runs at each site, not at the server"
        )
    if privacy.reproducible_noise:
        raise ConfigError("privacy.reproducible_noise is for simulated research runs only")
    if privacy.site_sample_rate != 1.0:
        raise ConfigError(
            f"privacy.site_sample_rate must be 1 over gRPC, got {privacy.site_sample_rate!r}"
        )
    if aggregation.protocol not in ("secagg", "secagg+"):
        raise ConfigError(
            "privacy over gRPC needs aggregation.protocol 'secagg' or 'secagg+' (the sites' L2 "
            f"clip and noise travel in the SecAgg setup), got {aggregation.protocol!r}"
        )
    if privacy.trust == "distributed" and privacy.accountant != "rdp":
        raise ConfigError(
            "privacy.accountant must be 'rdp' with trust='distributed' (the discrete "
            "mechanisms are bounded in RDP)"
        )


__all__ = [
    "CENTRAL_CLIP_KIND",
    "CentralClip",
    "ServerPrivacy",
    "SitePrivacy",
    "check_served",
]
