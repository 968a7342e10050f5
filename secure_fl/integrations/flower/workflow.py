"""The server side of a secure_fl round on Flower: a ServerApp workflow over the Message API.

:class:`SecureAggregationWorkflow` carries one round of the round layer (:mod:`secure_fl.rounds`)
in Flower ``Message`` objects of type ``"train"`` (:mod:`.records` says how): ``train`` (each node
trains and reports its site id and weight, never its arrays) -> the node->site map -> the plan
(:func:`plan_secure_round`) -> ``setup`` -> ``step`` ... until the server half is done ->
(CKKS) ``result``. Everything cryptographic is the round layer's; this module only addresses
messages and decides who is still in the round.

Who is who: a reply's sender is ``reply.metadata.src_node_id`` (the Grid authenticates it;
never a field of the message). At the ``train`` stage each node claims a site id: an id off the
server's roster or claimed by two nodes is excluded (every claimer); a claim of a site whose
roster entry has a verify key counts only with the site's signed proof (:mod:`._exchange`), so a
node cannot get an honest site of the active variant excluded. Afterwards a reply is taken
only from the node that claimed that site, as a reply to the message sent to it, with the
round's id and that site id in its envelope; anything else is refused and that site sends
nothing more this round. A ``left`` reply, an error reply and a missing reply (stage timeout)
are all a dropout.

Weights are self-reported (FedAvg's): before planning, a site whose weight is above
``max_weight`` or whose share of the total underflows to 0 is excluded
(:func:`._exchange.screen_weights`; logged, in ``outcome.excluded`` and
:attr:`FlowerRoundResult.refused_weights`). Without ``max_weight`` a site can weight the mean
as it likes (a huge weight makes the mean its own update).

Errors of :meth:`SecureAggregationWorkflow.run_round`: ThresholdError when fewer than
``min_sites`` nodes or participants are there, the round cannot be planned with its
participants, or the server half says too few remain (the round aborts, nothing is revealed;
one site cannot abort the run); ConfigError for a missing layout; other ProtocolError from the
server half abort the round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_fl.errors import ConfigError, ThresholdError
from secure_fl.integrations.flower import records
from secure_fl.integrations.flower._exchange import Exchange, array_bytes, screen_weights
from secure_fl.integrations.flower._plan import fresh_round_id
from secure_fl.rounds.base import RoundOutcome, ServerRound
from secure_fl.rounds.plan import plan_secure_round
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.transport.config_common import RosterEntry

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid

    from secure_fl.aggregators.server_opt import ServerOptimizer
    from secure_fl.integrations.flower.privacy import RoundPrivacy

log = logging.getLogger("secure_fl.integrations.flower")

#: How often the workflow polls ``grid.get_node_ids()`` while waiting for nodes (seconds).
POLL_S = 0.2


@dataclass(frozen=True)
class FlowerRoundResult:
    """One round's result (public). ``outcome`` the round layer's (survivors, dropped, excluded
    are site ids; ``excluded`` also holds site ids claimed by two nodes); ``mean`` the weighted
    mean update laid out like the update (after the privacy hook's release; None for CKKS: the
    server never decrypts); ``weights`` the participants' reported weights; ``nodes`` site id ->
    Flower node id; ``metrics`` site id -> the public metrics the site released with its masked
    input (SecAgg) or upload (plain; none in a CKKS round); ``seconds``
    wall time; ``bytes_to_sites`` / ``bytes_from_sites`` payload bytes (frames and arrays, not
    Flower's own framing); ``site_bytes`` site id -> bytes of the frames it sent;
    ``refused_weights`` site id -> the reported weight it was excluded for (above
    ``max_weight``, or a share that underflows to 0; also in ``outcome.excluded``)."""

    outcome: RoundOutcome
    mean: ArrayRecord | None = field(repr=False)
    weights: Mapping[int, float]
    nodes: Mapping[int, int]
    metrics: Mapping[int, Mapping[str, float]]
    seconds: float
    bytes_to_sites: int
    bytes_from_sites: int
    site_bytes: Mapping[int, int] = field(default_factory=dict)
    refused_weights: Mapping[int, float] = field(default_factory=dict)


class SecureAggregationWorkflow:
    """A ServerApp's secure aggregation: :meth:`run_round` runs one round over a Flower
    ``Grid``, :meth:`__call__` a FedAvg loop of rounds (``global += mean``).

    ``spec`` the aggregation (plain, secagg, secagg+, ckks); ``roster`` the federation's sites
    (site ids, names, verify keys for the active variant); ``min_sites`` the fewest nodes to
    wait for and participants to run with (>= 2); ``stage_timeout_s`` the longest wait for the
    replies of one stage (and for the nodes to connect); ``privacy`` the privacy hook (its plan
    sets ``l2_clip`` and the distributed-DP JSON, its release the mean to apply; not with
    CKKS); ``ckks_public`` the server's public CKKS context file and ``ckks_fingerprint`` the
    federation's (CKKS only; the server never holds a secret context); ``max_weight`` the
    largest reported weight accepted (a site reporting more is excluded from the round, not
    clipped; None: no bound, and a site can weight the mean as it likes).

    Errors: ConfigError naming the argument for an invalid one.
    """

    def __init__(
        self,
        spec: AggregationSpec,
        roster: Sequence[RosterEntry],
        *,
        min_sites: int = 2,
        stage_timeout_s: float = 600.0,
        privacy: RoundPrivacy | None = None,
        ckks_public: Path | None = None,
        ckks_fingerprint: str | None = None,
        max_weight: float | None = None,
    ) -> None:
        if not isinstance(spec, AggregationSpec):
            raise ConfigError(f"spec must be an AggregationSpec, got {type(spec).__name__}")
        entries = tuple(roster)
        if not entries or not all(isinstance(e, RosterEntry) for e in entries):
            raise ConfigError("roster must be a non-empty sequence of RosterEntry")
        ids = [e.site_id for e in entries]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"roster lists a site id twice: {sorted(ids)}")
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 2:
            raise ConfigError(f"min_sites must be an integer >= 2, got {min_sites!r}")
        if min_sites > len(entries):
            raise ConfigError(f"min_sites={min_sites} exceeds the roster's {len(entries)} sites")
        if (
            isinstance(stage_timeout_s, bool)
            or not isinstance(stage_timeout_s, int | float)
            or not (0 < stage_timeout_s < math.inf)
        ):
            raise ConfigError(
                f"stage_timeout_s must be a finite number > 0, got {stage_timeout_s!r}"
            )
        if max_weight is not None and (
            isinstance(max_weight, bool)
            or not isinstance(max_weight, int | float)
            or not (0 < max_weight < math.inf)
        ):
            raise ConfigError(f"max_weight must be None or a finite number > 0, got {max_weight!r}")
        self.public: Any = None
        if spec.protocol == "ckks":
            if ckks_public is None:
                raise ConfigError("ckks_public (the server's public CKKS context) is required")
            if privacy is not None:
                raise ConfigError(
                    "privacy cannot be used with ckks: the server never sees the mean it would "
                    "release (use secagg or secagg+ with distributed DP)"
                )
            from secure_fl.he.context import PublicContext

            self.public = PublicContext.load(ckks_public, expected_fingerprint=ckks_fingerprint)
        elif ckks_public is not None or ckks_fingerprint is not None:
            raise ConfigError(f"ckks_public/ckks_fingerprint apply to ckks, not {spec.protocol!r}")
        self.spec = spec
        self.roster = {e.site_id: e for e in entries}
        self.min_sites = min_sites
        self.stage_timeout_s = float(stage_timeout_s)
        self.privacy = privacy
        self.max_weight = None if max_weight is None else float(max_weight)
        #: Every round's result, in order (:meth:`__call__` appends).
        self.history: list[FlowerRoundResult] = []

    # -- nodes ------------------------------------------------------------------------------

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected node ids once at least ``min_sites`` are there (polled until
        ``stage_timeout_s``). Errors: ThresholdError when they are not reached in time."""
        deadline = time.monotonic() + self.stage_timeout_s
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.min_sites:
                return nodes
            if time.monotonic() >= deadline:
                raise ThresholdError(
                    f"{len(nodes)} Flower node(s) connected within {self.stage_timeout_s:g} s; "
                    f"min_sites={self.min_sites} are required"
                )
            time.sleep(POLL_S)

    # -- one round --------------------------------------------------------------------------

    def run_round(
        self,
        grid: Grid,
        *,
        arrays: ArrayRecord | None,
        config: ConfigRecord | None = None,
        round_index: int = 1,
        node_ids: Sequence[int] | None = None,
        layout: records.Layout | None = None,
    ) -> FlowerRoundResult:
        """Run one secure_fl round over ``grid`` among ``node_ids`` (default: every connected
        node, once ``min_sites`` are there). ``arrays`` the global model sent with the train
        stage (each site's update is its trained model minus it); None: the sites send their
        trained arrays as the update, and ``layout`` (the update's, :class:`records.Layout`)
        is required. ``config`` goes to the user's train function.

        Guarantee: only the round layer's messages leave the server; each reply is taken only
        from the node that claimed its site id (see the module docstring).
        A site whose reported weight is refused (module docstring) is excluded before planning.
        Errors: ThresholdError (too few nodes, participants or survivors, a round that
        cannot be planned with its participants: nothing revealed; or a mean that is not
        finite: not released); ConfigError (no layout);
        ProtocolError on an abort."""
        from flwr.app import ConfigRecord

        start = time.perf_counter()
        if arrays is not None:
            _, layout = records.flatten(arrays, where="arrays")
        if layout is None:
            raise ConfigError("run_round: layout is required when arrays is None")
        nodes = list(node_ids) if node_ids is not None else self.wait_for_nodes(grid)
        round_id = fresh_round_id()
        ex = Exchange(grid, round_id, self.stage_timeout_s, group=str(round_index))

        user: dict[str, Any] = {"config": config if config is not None else ConfigRecord()}
        if arrays is not None:
            user["arrays"] = arrays
            ex.bytes_to_sites += array_bytes(arrays) * len(nodes)
        claims = ex.train(nodes, user, {s: e.verify_key for s, e in self.roster.items()})
        duplicated = {s for s, claimers in claims.items() if len(claimers) > 1}
        off_roster = sorted(s for s in claims if s not in self.roster)
        if duplicated or off_roster:
            log.warning(
                "round %d: excluded site ids claimed by two nodes %s and off the roster %s",
                round_index,
                sorted(duplicated),
                off_roster,
            )
        bound = {s: c[0] for s, c in claims.items() if s not in duplicated and s in self.roster}
        weights, refused = screen_weights({s: w for s, (_, w) in bound.items()}, self.max_weight)
        for site, reason in refused.items():
            log.warning("round %d: excluded site %d: %s", round_index, site, reason)
        ex.bind({s: bound[s][0] for s in weights})
        if len(weights) < self.min_sites:
            raise ThresholdError(
                f"round {round_index}: {len(weights)} site(s) trained and claimed a roster id; "
                f"min_sites={self.min_sites} are required"
            )
        server = self._server_round(weights, layout, round_id, round_index)
        outcome = self._drive(ex, server)
        mean = None
        if outcome.mean is not None:
            vector = np.asarray(outcome.mean, dtype=np.float64)
            if self.privacy is not None:
                released = self.privacy.release(round_index, outcome, vector, weights=weights)
                vector = np.asarray(released, dtype=np.float64)
            with np.errstate(over="ignore"):  # an overflow into the model's dtype: below
                mean = records.unflatten(vector, layout)
            if not (
                np.all(np.isfinite(vector))
                and all(np.all(np.isfinite(a.numpy())) for a in mean.values())
            ):
                # Never hand on a mean that would make the global model non-finite for good.
                raise ThresholdError(
                    f"round {round_index}: the mean update is not finite (in float64 or in the "
                    "model's dtypes); the round is not released"
                )
        if duplicated or refused:
            outcome = dataclasses.replace(
                outcome, excluded=outcome.excluded | duplicated | frozenset(refused)
            )
        seconds = time.perf_counter() - start
        log.info(
            "round %d (%s): survivors %s, dropped %s, excluded %s, %.2f s",
            round_index,
            self.spec.protocol,
            sorted(outcome.survivors),
            sorted(outcome.dropped),
            sorted(outcome.excluded),
            seconds,
        )
        return FlowerRoundResult(
            outcome=outcome,
            mean=mean,
            weights=weights,
            nodes=dict(ex.node_of),
            metrics=dict(ex.metrics),
            seconds=seconds,
            bytes_to_sites=ex.bytes_to_sites,
            bytes_from_sites=ex.bytes_from_sites,
            site_bytes=dict(ex.site_bytes),
            refused_weights={s: bound[s][1] for s in refused},
        )

    def _server_round(
        self, weights: dict[int, float], layout: records.Layout, round_id: int, index: int
    ) -> ServerRound:
        l2_clip, dp_json, floor = None, "", None
        if self.privacy is not None:
            pp = self.privacy.plan(index, sorted(weights), layout.size, weights=dict(weights))
            l2_clip, dp_json, floor = pp.l2_clip, pp.distributed_dp_json, pp.threshold
        keys = {s: self.roster[s].verify_key for s in weights}
        try:
            plan = plan_secure_round(
                self.spec,
                weights,
                vector_length=layout.size,
                round_id=round_id,
                verify_keys={s: k for s, k in keys.items() if k is not None},
                distributed_dp_json=dp_json,
                l2_clip=l2_clip,
                min_threshold=floor,
            )
        except ConfigError as exc:  # nothing was sent yet: abort the round, never the run
            raise ThresholdError(
                f"round {index} cannot be planned with sites {sorted(weights)}: {exc}"
            ) from exc
        if self.spec.protocol == "plain":
            from secure_fl.rounds.plain import PlainServerRound

            return PlainServerRound(plan)
        if self.spec.masked:
            from secure_fl.rounds.secagg import SecAggServerRound

            return SecAggServerRound(plan, phase_deadline_s=self.stage_timeout_s)
        from secure_fl.rounds.ckks import CkksServerRound

        structure = tuple(
            (key, "float64", shape) for key, shape in zip(layout.keys, layout.shapes, strict=True)
        )
        return CkksServerRound(
            plan,
            self.public,
            structure=structure,
            names={s: self.roster[s].name for s in weights},
            min_sites=self.min_sites,
            phase_deadline_s=self.stage_timeout_s,
        )

    def _drive(self, ex: Exchange, server: ServerRound) -> RoundOutcome:
        """Setup, then close/step until the server half is done; CKKS: the result stage."""
        ex.stage("setup", server.setup(), server)
        while not server.done:
            out = server.close()  # ThresholdError: too few remain, the round reveals nothing
            if out:
                ex.stage("step", out, server)
        outcome = server.outcome()
        if self.spec.protocol == "ckks":
            from secure_fl.rounds.ckks import CkksServerRound

            if isinstance(server, CkksServerRound) and outcome.encrypted is not None:
                result = server.result(outcome)
                ex.stage("result", dict.fromkeys(sorted(outcome.survivors), result), None)
        return outcome

    # -- the FedAvg loop --------------------------------------------------------------------

    def __call__(
        self,
        grid: Grid,
        context: Context,
        *,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        config: ConfigRecord | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> ArrayRecord:
        """FedAvg with secure aggregation: ``num_rounds`` rounds, each ``global += mean``
        (the mean update of the survivors), or ``global += server_optimizer.step(mean)``
        (:mod:`secure_fl.aggregators.server_opt`: FedAvgM, FedAdam; post-processing of the
        released mean). A round that aborts (ThresholdError) leaves the global model unchanged
        and is logged; the loop goes on. Results are appended to :attr:`history`.
        Errors: ConfigError for ``num_rounds`` < 1 or a CKKS spec (the server never decrypts
        the CKKS model; run :meth:`run_round` and let the sites keep theirs); ThresholdError when
        every round aborted (naming the first reason: a run that trained nothing fails)."""
        if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
            raise ConfigError(f"num_rounds must be an integer >= 1, got {num_rounds!r}")
        if self.spec.protocol == "ckks":
            raise ConfigError(
                "the FedAvg loop needs the mean on the server; with ckks only the sites decrypt "
                "it (use run_round)"
            )
        current = initial_arrays
        first: ThresholdError | None = None
        released = 0
        for index in range(1, num_rounds + 1):
            try:
                result = self.run_round(grid, arrays=current, config=config, round_index=index)
            except ThresholdError as exc:
                log.warning("round %d aborted, global model unchanged: %s", index, exc)
                first = first or exc
                continue
            released += 1
            self.history.append(result)
            if result.mean is None:
                continue
            step = result.mean
            if server_optimizer is not None:
                flat, layout = records.flatten(result.mean, where="mean")
                step = records.unflatten(server_optimizer.step(flat), layout)
            stepped = add_arrays(current, step)
            if not all(np.all(np.isfinite(stepped[k].numpy())) for k in stepped):
                # A finite model plus a finite step can overflow the model's dtype: never apply it.
                log.warning("round %d: the new global model is not finite; not applied", index)
                continue
            current = stepped
        if released == 0 and first is not None:
            # Every round aborted: say so (a run that trained nothing must not look finished).
            raise ThresholdError(
                f"all {num_rounds} rounds aborted and the global model is unchanged; the first "
                f"reason: {first}"
            )
        return current


def add_arrays(base: ArrayRecord, delta: ArrayRecord) -> ArrayRecord:
    """``base + delta`` key by key (same keys and shapes), each array in ``base``'s dtype.
    Errors: ConfigError when the keys or shapes differ."""
    from flwr.app import Array, ArrayRecord

    if list(base.keys()) != list(delta.keys()):
        raise ConfigError("the mean's arrays are not the global model's (keys differ)")
    out: dict[str, Any] = {}
    for key in base:
        old = base[key].numpy()
        step = delta[key].numpy()
        if old.shape != step.shape:
            raise ConfigError(f"array {key!r}: the mean has shape {step.shape}, not {old.shape}")
        with np.errstate(over="ignore"):  # an overflow is caught by the caller's finiteness check
            out[key] = Array((old.astype(np.float64) + step.astype(np.float64)).astype(old.dtype))
    return ArrayRecord(out)


__all__ = [
    "FlowerRoundResult",
    "SecureAggregationWorkflow",
    "add_arrays",
    "fresh_round_id",
    "plan_secure_round",
]
