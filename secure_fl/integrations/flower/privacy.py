"""Differential privacy for secure_fl rounds on Flower: the server's privacy hook and run folder.

:class:`FlowerPrivacy` is the :class:`RoundPrivacy` the Flower workflow
(:class:`secure_fl.integrations.flower.workflow.SecureAggregationWorkflow`) calls around every
round. It is a thin adapter over the gRPC server's privacy layer
(:class:`secure_fl.transport.privacy.ServerPrivacy`, transport-neutral), so a Flower run folder is
the same auditable run folder as a gRPC server's ``state_dir``: ``config.json``,
``privacy_ledger.sqlite`` (+ ``.head``), ``metrics.jsonl`` and, after a budget stop,
``stopped.json``; ``secure-fl audit OUT_DIR`` verifies it.

Round numbers. The ledger, metrics.jsonl, stopped.json and the audit number the **released**
rounds from 1 (the ledger stores them from 0): the first round :meth:`FlowerPrivacy.release`
confirms is round 1, the next round 2, and so on; a new :class:`FlowerPrivacy` on the same
``out_dir`` continues after the last released round. The ``round_index`` the workflow passes
(its own count, from 1) only pairs a :meth:`~FlowerPrivacy.plan` with its
:meth:`~FlowerPrivacy.release`. A round that aborts after its plan (the workflow's
ThresholdError: nothing revealed) is not counted: the next plan is a retried attempt of the same
ledger round and reuses its intents (never recorded twice), as the gRPC server retries a failed
round. So the two numbers differ after an aborted round; :attr:`FlowerPrivacy.last_record` names
both.

Per round:

1. :meth:`FlowerPrivacy.plan` before the round's setup: checks the budgets and records one
   ledger intent per roster site (every site is charged every round, joining or not: an
   over-count, never an under-count), and returns the :class:`PrivacyPlan`: the L2 bound every
   site clips its update to (``privacy.clip``; it replaces the spec's ``l2_clip``) and the JSON
   bound into the round (``SecAggSetup.distributed_dp_json`` and ``extra_binding``): trust
   ``central`` ``{"kind": "central_clip/v1", "clip": c}``, trust ``distributed`` the
   :class:`~secure_fl.privacy.codec_noise.CodecNoiseConfig` every site checks against its own
   floor (:class:`~secure_fl.transport.privacy_site.SitePrivacy`) before adding its noise share.
   For distributed trust the plan also names the SecAgg ``threshold`` the noise is sized for: the
   round must be planned with at least that threshold (every site refuses a lower one).
2. :meth:`FlowerPrivacy.release` after the round: trust ``central`` adds Gaussian noise from the
   OS CSPRNG to the survivors' weighted mean (std ``noise_multiplier * clip * max(w) / sum(w)``
   over the survivors' reported weights ``w``, given to :meth:`~FlowerPrivacy.plan` or
   :meth:`~FlowerPrivacy.release`), trust ``distributed`` adds nothing (the sites did); then the
   intents are confirmed and a metrics row is appended. Only the returned mean may be applied to
   the model.

The noise is calibrated for ``rounds`` released rounds; a plan after them is refused. A run
that stops earlier without a budget stop (or with an aborted round's intents pending) is
reported by the audit (``RUN_INCOMPLETE``, ``UNCONFIRMED_INTENT``: its spend is counted in full).
A new :class:`FlowerPrivacy` on the same ``out_dir`` with other privacy, roster, aggregation or
vector length is refused (ConfigError).

Refused when built (ConfigError, from ``ServerPrivacy``): ``privacy.level`` other than
``"site"``, ``reproducible_noise``, ``site_sample_rate < 1``, a protocol other than SecAgg /
SecAgg+ (plain and CKKS rounds carry no DP configuration the sites can check), distributed
trust with an accountant other than RDP or ``min_sites`` below the noise threshold.

Note: ``config.json`` says ``"kind": "grpc-server"`` (written by ``ServerPrivacy``); the audit does
not read it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from secure_fl.errors import ConfigError, ThresholdError
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.rounds.base import RoundOutcome
from secure_fl.rounds.policy import SitePolicy
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.transport.config_common import RosterEntry
from secure_fl.transport.privacy import METRICS_FILENAME, ServerPrivacy


@dataclass(frozen=True)
class PrivacyPlan:
    """What the privacy layer decides for one round, before its setup.

    ``l2_clip``: the L2 bound every site clips its update to (the round's ``l2_clip``, replacing
    the spec's); None: no bound. ``distributed_dp_json``: the JSON bound into the round
    (``extra_binding``, ``SecAggSetup.distributed_dp_json``); ``""`` for none. ``threshold``: the
    smallest SecAgg threshold the round may be planned with (distributed noise is sized for it;
    sites refuse a plan below it); None: the spec's own.
    """

    l2_clip: float | None
    distributed_dp_json: str
    threshold: int | None = None


@runtime_checkable
class RoundPrivacy(Protocol):
    """The privacy hook of the Flower workflow. ``round_index``: the workflow's round number
    (from 1), pairing a plan with its release; ``weights``: the participants' reported weights
    by site id (central noise is sized on them: pass them to plan or to release)."""

    def plan(
        self,
        round_index: int,
        site_ids: Sequence[int],
        vector_length: int,
        weights: Mapping[int, float] | None = None,
    ) -> PrivacyPlan:
        """Before round ``round_index`` over ``site_ids`` (the participants): budget check,
        ledger intents, the round's clip and DP JSON. Errors: BudgetExceededError (the run
        stops), ConfigError (this round cannot run with these participants)."""
        ...

    def release(
        self,
        round_index: int,
        outcome: RoundOutcome,
        mean: np.ndarray,
        weights: Mapping[int, float] | None = None,
    ) -> np.ndarray:
        """After the round: central noise (central trust) and the ledger's confirmation.
        Returns the mean to apply. Errors: ConfigError."""
        ...


def site_policy(
    config: PrivacyConfig,
    *,
    protocol: str,
    rounds: int,
    base: SitePolicy | None = None,
) -> SitePolicy:
    """The policy a site should pin for a run under ``config`` (``base`` with the privacy floor
    of :func:`secure_fl.transport.provision_privacy.privacy_floor`): distributed trust requires
    DP and refuses noise below the multiplier ``config`` calls for over ``rounds`` rounds;
    central trust adds no floor (the site cannot check the server's noise). Pass it to
    ``provision_flower(policy=...)``. Errors: ConfigError when the configuration cannot be
    served (module docstring)."""
    from secure_fl.transport.provision_privacy import privacy_floor

    floor = privacy_floor(config, protocol, rounds)
    return dataclasses.replace(base if base is not None else SitePolicy(), **floor)


def _names(
    roster: Sequence[RosterEntry] | Mapping[int, str] | None, num_sites: int | None
) -> dict[int, str]:
    if (roster is None) == (num_sites is None):
        raise ConfigError("FlowerPrivacy needs exactly one of roster= and num_sites=")
    if roster is None:
        if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 2:
            raise ConfigError(f"num_sites must be an integer >= 2, got {num_sites!r}")
        return {i: f"site-{i}" for i in range(1, num_sites + 1)}
    if isinstance(roster, Mapping):
        names = {int(sid): str(name) for sid, name in roster.items()}
    else:
        names = {}
        for entry in roster:
            if entry.site_id in names:
                raise ConfigError(f"roster lists site id {entry.site_id} twice")
            names[entry.site_id] = entry.name
    if len(names) < 2:
        raise ConfigError(f"roster must list at least 2 sites, got {len(names)}")
    if len(set(names.values())) != len(names):
        raise ConfigError("roster names must be unique (the ledger charges sites by name)")
    return dict(sorted(names.items()))


def _completed_rounds(out_dir: Path) -> int:
    """The last round (from 1) with a metrics row in ``out_dir`` (0: none)."""
    path = out_dir / METRICS_FILENAME
    if not path.exists():
        return 0
    last = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            last = max(last, int(row["round"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} holds a malformed row: {exc}") from exc
    return last


class FlowerPrivacy:
    """Site-level DP (DP-FedAvg) for a Flower run; implements :class:`RoundPrivacy` (module
    docstring) and writes an auditable run folder to ``out_dir``.

    ``config``: the run's :class:`PrivacyConfig` (``level="site"``). ``roster``: the sites
    (:class:`RosterEntry` list, e.g. ``FlowerFederation.roster``, or site id -> name), or
    ``num_sites`` (ids 1..n named ``site-<id>``): exactly one. ``vector_length``: the flattened
    update's length (every round's). ``rounds``: how many rounds the noise is calibrated for
    (``target_epsilon`` holds over all of them). ``aggregation``: the workflow's
    :class:`AggregationSpec` (default: SecAgg+ with its defaults). ``min_sites``: the fewest
    participants a round may start with (distributed trust: at least the noise threshold).

    Errors: ConfigError (module docstring; a bad argument names it).
    """

    def __init__(
        self,
        config: PrivacyConfig,
        out_dir: Path,
        *,
        vector_length: int,
        rounds: int,
        roster: Sequence[RosterEntry] | Mapping[int, str] | None = None,
        num_sites: int | None = None,
        aggregation: AggregationSpec | None = None,
        min_sites: int = 2,
        federation: str = "flower",
    ) -> None:
        if isinstance(vector_length, bool) or not isinstance(vector_length, int):
            raise ConfigError(f"vector_length must be an integer >= 1, got {vector_length!r}")
        if vector_length < 1:
            raise ConfigError(f"vector_length must be an integer >= 1, got {vector_length}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
        self.names = _names(roster, num_sites)
        self.vector_length = vector_length
        self.rounds = rounds
        self.out_dir = Path(out_dir)
        self.aggregation = aggregation if aggregation is not None else AggregationSpec()
        self.completed = _completed_rounds(self.out_dir)
        self.server = ServerPrivacy(
            config,
            self.out_dir,
            rounds=rounds,
            roster=list(self.names.values()),
            dimension=vector_length,
            aggregation=self.aggregation,
            min_sites=min_sites,
            federation=federation,
            kind="flower-server",
        )
        self.config = config
        self._label: int | None = None  # the caller's round_index of the pending plan
        self._participants: dict[int, str] = {}
        self._weights: dict[int, float] | None = None
        self._final_epsilon: float | None = None
        self.last_record: dict[str, Any] = {}
        """The last release's ``privacy`` record (max epsilon, delta, ledger head, DP event)."""

    # -- the hook ---------------------------------------------------------------------------------

    def plan(
        self,
        round_index: int,
        site_ids: Sequence[int],
        vector_length: int,
        weights: Mapping[int, float] | None = None,
    ) -> PrivacyPlan:
        """Before the caller's round ``round_index`` (>= 1; pairs this plan with its release)
        over the participants ``site_ids``: check the budgets and record the intents of the next
        ledger round (``completed + 1``; a retried attempt reuses them). ``weights``: the
        participants' reported weights, kept for :meth:`release` (or given there).

        Errors: BudgetExceededError when a budget would be exceeded (``stopped.json`` is
        written; the round must not run, the run stops); ConfigError after :meth:`finish`, for a
        bad round index, all ``rounds`` rounds released already, a site id off the roster, a
        vector length other than the configured one; ThresholdError (distributed) for fewer
        participants than the noise threshold (the round is not started, nothing is charged, the
        run goes on)."""
        if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 1:
            raise ConfigError(f"round_index must be an integer >= 1, got {round_index!r}")
        if self._final_epsilon is not None:
            raise ConfigError("this FlowerPrivacy is finished (its ledger is closed)")
        if self.completed >= self.rounds:
            raise ConfigError(
                f"all rounds={self.rounds} rounds the noise is calibrated for were released "
                f"in out_dir {self.out_dir} (the run continues its ledger): use a new out_dir "
                "for a new run"
            )
        if vector_length != self.vector_length:
            raise ConfigError(
                f"vector_length must be {self.vector_length} (the configured model), got "
                f"{vector_length!r}"
            )
        unknown = sorted(set(site_ids) - set(self.names))
        if unknown:
            raise ConfigError(f"site ids {unknown} are not on the roster {sorted(self.names)}")
        participants = {int(s): self.names[int(s)] for s in sorted(set(site_ids))}
        sizing = self.server.session.distributed
        if sizing is not None and len(participants) < sizing.threshold:
            # Too few sites for the noise this round: the round cannot run, the run goes on
            # (nothing is charged: no intent is recorded).
            raise ThresholdError(
                f"{len(participants)} participants are fewer than the noise threshold "
                f"t={sizing.threshold}: the round is not started"
            )
        self._label = None
        text = self.server.before_round(self.completed, participants)
        self._label, self._participants = round_index, participants
        self._weights = None
        if weights is not None:
            self._weights = {int(s): float(w) for s, w in weights.items()}
        return PrivacyPlan(
            l2_clip=self.server.l2_clip(),
            distributed_dp_json=text,
            threshold=sizing.threshold if sizing is not None else None,
        )

    def release(
        self,
        round_index: int,
        outcome: RoundOutcome,
        mean: np.ndarray,
        weights: Mapping[int, float] | None = None,
    ) -> np.ndarray:
        """After the round :meth:`plan` prepared last (the same ``round_index``): add the
        central noise (central trust), confirm the ledger intents, append the metrics row.
        ``mean``: the survivors' weighted mean (``outcome.mean`` or the same vector);
        ``weights``: the participants' reported weights by site id, here or given to
        :meth:`plan` (central trust needs them to size the noise; distributed trust uses them
        for the recorded noise std only, equal weights otherwise). Returns the (noised) mean to
        apply, float64.

        Errors: ConfigError when the round is not the one planned last (or was released
        already), a survivor was not a planned participant, ``mean`` is not a finite vector of
        the configured length, or (central) a survivor's weight is missing."""
        if self._label is None or round_index != self._label:
            raise ConfigError(
                f"round {round_index!r} is not the round planned last ({self._label}): plan it, "
                "then release it once"
            )
        vector = np.asarray(mean, dtype=np.float64)
        if vector.shape != (self.vector_length,) or not np.all(np.isfinite(vector)):
            raise ConfigError(
                f"mean must be a finite vector of length {self.vector_length}, got shape "
                f"{vector.shape}"
            )
        participants = self._participants
        strangers = sorted(set(outcome.survivors) - set(participants))
        if strangers:
            raise ConfigError(
                f"survivors {strangers} of round {round_index} were not planned participants"
            )
        survivors = {s: participants[s] for s in sorted(outcome.survivors)}
        if weights is None:
            weights = self._weights
        if weights is None:
            if self.server.session.distributed is None:
                raise ConfigError(
                    "central noise needs the reported weights: pass weights= (site id -> "
                    "reported weight) to plan() or release()"
                )
            weights = dict.fromkeys(survivors, 1.0)
        record: dict[str, Any] = {}
        released = self.server.apply(self.completed, vector, survivors, dict(weights), record)
        self._label, self._participants, self._weights = None, {}, None
        self.completed += 1
        self.last_record = {
            **record.get("privacy", {}),
            "round": self.completed,
            "round_index": round_index,
        }
        return np.asarray(released, dtype=np.float64)

    # -- reporting and closing --------------------------------------------------------------------

    def epsilon(self) -> float:
        """The largest epsilon any site has spent so far (the ledger's, intents included; after
        :meth:`finish`, its value then)."""
        if self._final_epsilon is not None:
            return self._final_epsilon
        return self.server.epsilon()

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian-equivalent noise multiplier the ledger records per round."""
        return self.server.session.planned_noise

    def finish(self) -> None:
        """Close the ledger (the run folder is then ready for ``secure-fl audit``); once (a
        second call does nothing). No round can be planned after it."""
        if self._final_epsilon is not None:
            return
        self._final_epsilon = self.server.epsilon()
        self.server.finish(self.completed)

    def __enter__(self) -> FlowerPrivacy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish()


__all__ = ["FlowerPrivacy", "PrivacyPlan", "RoundPrivacy", "site_policy"]
