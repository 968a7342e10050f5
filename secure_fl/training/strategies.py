"""Collaboration strategies compared in the literature, each a small class behind one interface.

* ``fedavg`` — federated averaging (McMahan et al. 2017) of the sites' updates, weighted by their
  number of training cases, through any aggregator (``plain``, ``secagg``, ``secagg+``, ``ckks``),
  then a server optimiser (``strategy.server_optimizer``: ``fedavg``, ``fedavgm``, ``fedadam``;
  :mod:`secure_fl.aggregators.server_opt`) turns the mean update into the global model's step.
* ``fedprox`` — FedAvg with a proximal term in the local loss (Li et al. 2020).
* ``cwt`` — cyclical weight transfer: each round the model visits every site in turn (Chang et al. 2018).
* ``swt`` — single weight transfer: the model trains at one site, then moves on, visiting each once.
* ``ensemble`` — each site trains its own model; predictions are averaged over all site models.
* ``local`` — each site trains alone (the "no collaboration" baseline); scored as single-institution
  models are in Sheller et al. 2019: every site's model on every site's held-out cases, averaged.
* ``centralized`` — one model trained on the pooled data (the upper baseline, not private).

A strategy's state is a mapping of named model states (numpy), which is all a checkpoint needs
(FedAvg with a stateful server optimiser keeps its momentum / moments there too, under
``"server_optimizer"``, so a resumed run takes the same steps).
One *round* costs every strategy the same local work: every site's data is seen
``train.local_epochs`` times (for ``swt``, one site's data per round, as the model is at one site).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.fl.utils.exchange_object import ExchangeObject

from secure_fl.aggregators import create as create_aggregator
from secure_fl.aggregators.server_opt import ServerOptimizer, server_optimizer_from_mapping
from secure_fl.errors import ConfigError
from secure_fl.training.model import State, state_add, state_sub
from secure_fl.training.strategy_names import STRATEGIES as STRATEGIES
from secure_fl.training.trainer import SiteTrainer

#: Named model states, e.g. {"global": ...} or one per site.
StrategyState = dict[str, State]


@dataclass
class Federation:
    """The sites of one simulated federation (and, for the centralised baseline, the pooled site)."""

    sites: dict[str, SiteTrainer]
    pooled: SiteTrainer | None = None
    initial: State = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.sites)


@dataclass(frozen=True)
class RoundInfo:
    """What one round did: mean training loss, optimiser steps, and the aggregation report."""

    train_loss: float
    steps: int
    aggregation: Mapping[str, Any] | None = None


class Strategy(ABC):
    """One way of collaborating. Subclasses set ``name`` and implement the three methods.

    ``mean_over_models``: when True, the models of :meth:`eval_states` are scored one by one and
    their Dice averaged (instead of scoring their ensemble).
    """

    name: str
    mean_over_models: bool = False

    @abstractmethod
    def init_state(self, fed: Federation) -> StrategyState:
        """The state before round 0."""

    @abstractmethod
    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        """Run round ``round_id`` and return the new state."""

    @abstractmethod
    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        """The model(s) whose ensemble is evaluated on ``site``'s held-out cases."""

    def final_models(self, state: StrategyState) -> StrategyState:
        """The models to save at the end of the run."""
        return state

    def training_sites(self, fed: Federation, round_id: int) -> list[str]:
        """The trainers that train in ``round_id`` (site names, or "pooled")."""
        return fed.names


def _train(site: SiteTrainer, weights: State, round_id: int, tag: str, **extra: Any) -> State:
    site.train(
        ExchangeObject(weights=weights),
        {"round": round_id, "rounds": site.rounds, "tag": tag, **extra},
    )
    out = site.get_weights()
    assert out.weights is not None
    return dict(out.weights)


def _info(sites: Sequence[SiteTrainer], aggregation: Mapping[str, Any] | None = None) -> RoundInfo:
    losses = [s.last_loss for s in sites]
    return RoundInfo(sum(losses) / len(losses), sum(s.last_steps for s in sites), aggregation)


class FedAvg(Strategy):
    """Sample-weighted federated averaging of model deltas through an aggregator.

    ``dropouts`` maps a round to the sites that vanish in it (their update is lost; secure
    aggregation recovers the others' sum); the mean is taken over the survivors.
    ``server_optimizer``: the table ``{name = "fedavg" | "fedavgm" | "fedadam", <options>}``
    (:func:`~secure_fl.aggregators.server_opt.make_server_optimizer`; default plain FedAvg, whose
    step is the mean update itself). Its state travels in the strategy state (checkpointed).
    Errors: ConfigError for an invalid aggregator or server optimiser option.
    """

    name = "fedavg"

    def __init__(
        self,
        aggregator: str = "plain",
        aggregator_options: Mapping[str, Any] | None = None,
        *,
        fedprox_mu: float = 0.0,
        dropouts: Mapping[int, Sequence[str]] | None = None,
        server_optimizer: Mapping[str, Any] | None = None,
    ) -> None:
        self.aggregator_name = aggregator
        self.aggregator = create_aggregator(aggregator, **dict(aggregator_options or {}))
        self.fedprox_mu = fedprox_mu
        self.dropouts = {int(k): list(v) for k, v in (dropouts or {}).items()}
        self.server_optimizer_options = dict(server_optimizer or {})
        where = "strategy.server_optimizer"
        self.server_optimizer = server_optimizer_from_mapping(
            self.server_optimizer_options, where=where
        )

    def init_state(self, fed: Federation) -> StrategyState:
        return {"global": dict(fed.initial)}

    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        current = state["global"]
        deltas: dict[str, State] = {}
        weights: dict[str, float] = {}
        for name in fed.names:
            site = fed.sites[name]
            local = _train(site, current, round_id, self.name, fedprox_mu=self.fedprox_mu)
            deltas[name] = state_sub(local, current)
            weights[name] = float(site.num_train_cases)
        result = self.aggregator.aggregate(deltas, weights, dropped=self.dropouts.get(round_id, []))
        new_state: StrategyState = {}
        step = apply_server_optimizer(self.server_optimizer, state, result.mean, new_state)
        new_global = state_add(current, step)
        report = {k: v for k, v in result.report.items() if k not in ("site_seconds",)}
        return {"global": new_global, **new_state}, _info(list(fed.sites.values()), report)

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state["global"]]

    def final_models(self, state: StrategyState) -> StrategyState:
        return {"global": state["global"]}


#: The strategy-state key of the server optimiser's state (a State of float64 vectors).
SERVER_OPTIMIZER_KEY = "server_optimizer"


def apply_server_optimizer(
    optimizer: ServerOptimizer,
    state: Mapping[str, State],
    mean: Mapping[str, np.ndarray],
    out: StrategyState,
) -> State:
    """The step (float32, ``mean``'s names and shapes) that ``optimizer`` takes for the mean
    update ``mean``, starting from the optimiser state saved in ``state`` (or a fresh one when
    there is none); the new optimiser state goes into ``out[SERVER_OPTIMIZER_KEY]`` (only for
    stateful optimisers). Plain FedAvg with lr 1 gives ``mean`` unchanged.
    Errors: ConfigError when the saved state does not fit; InvalidUpdateError for a
    non-finite mean.
    """
    saved = state.get(SERVER_OPTIMIZER_KEY)
    opt = type(optimizer)(**optimizer.options())  # a fresh one: the strategy state is the truth
    if saved is not None:
        opt.load_state_dict(_unpack(opt.name, saved))
    names = list(mean)
    flat = np.concatenate([np.asarray(mean[k], dtype=np.float64).ravel() for k in names])
    vec = opt.step(flat)
    packed = _pack(opt.state_dict())
    if packed:
        out[SERVER_OPTIMIZER_KEY] = packed
    step: State = {}
    start = 0
    for k in names:
        size = int(np.asarray(mean[k]).size)
        step[k] = vec[start : start + size].reshape(np.shape(mean[k])).astype(np.float32)
        start += size
    return step


def _pack(state: Mapping[str, Any]) -> State:
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    if not arrays:
        return {}
    return {
        **arrays,
        "steps": np.array([state["steps"]], dtype=np.int64),
        "length": np.array([state["length"]], dtype=np.int64),
    }


def _unpack(name: str, packed: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in packed.items() if k not in ("steps", "length")}
    out.update(
        name=name,
        steps=int(np.asarray(packed["steps"]).ravel()[0]),
        length=int(np.asarray(packed["length"]).ravel()[0]),
    )
    return out


class FedProx(FedAvg):
    """FedAvg with the proximal term ``mu/2 ||w - w_global||^2`` in each site's loss."""

    name = "fedprox"

    def __init__(self, *args: Any, fedprox_mu: float = 0.01, **kwargs: Any) -> None:
        if fedprox_mu <= 0:
            raise ConfigError(f"fedprox_mu must be > 0 for fedprox, got {fedprox_mu}")
        super().__init__(*args, fedprox_mu=fedprox_mu, **kwargs)


class CyclicWeightTransfer(Strategy):
    """Each round the model trains at every site in turn, in a fixed order."""

    name = "cwt"

    def init_state(self, fed: Federation) -> StrategyState:
        return {"global": dict(fed.initial)}

    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        current = state["global"]
        for name in fed.names:
            current = _train(fed.sites[name], current, round_id, self.name)
        return {"global": current}, _info(list(fed.sites.values()))

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state["global"]]


class SingleWeightTransfer(Strategy):
    """The model trains at one site for its share of the rounds, then moves to the next."""

    name = "swt"

    def __init__(self, rounds: int) -> None:
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        self.rounds = rounds

    def init_state(self, fed: Federation) -> StrategyState:
        return {"global": dict(fed.initial)}

    def site_for_round(self, fed: Federation, round_id: int) -> str:
        names = fed.names
        return names[min(len(names) - 1, round_id * len(names) // self.rounds)]

    def training_sites(self, fed: Federation, round_id: int) -> list[str]:
        return [self.site_for_round(fed, round_id)]

    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        site = fed.sites[self.site_for_round(fed, round_id)]
        current = _train(site, state["global"], round_id, self.name)
        return {"global": current}, _info([site])

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state["global"]]


class LocalOnly(Strategy):
    """Every site trains its own model on its own data; no collaboration.

    Evaluated as Sheller et al. (2019) evaluate single-institution models: each site's held-out
    cases are scored by every site's model in turn and the Dice averaged, so the number reflects how
    a model trained at one institution does on the data of any institution.
    """

    name = "local"
    mean_over_models = True

    def init_state(self, fed: Federation) -> StrategyState:
        return {name: dict(fed.initial) for name in fed.names}

    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        new = {
            name: _train(fed.sites[name], state[name], round_id, self.name) for name in fed.names
        }
        return new, _info(list(fed.sites.values()))

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state[name] for name in fed.names]


class Ensemble(LocalOnly):
    """Single-site models trained independently; predictions averaged over all of them."""

    name = "ensemble"
    mean_over_models = False

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state[name] for name in fed.names]


class Centralized(Strategy):
    """One model trained on the pooled training data of every site (the non-private baseline)."""

    name = "centralized"

    def training_sites(self, fed: Federation, round_id: int) -> list[str]:
        return ["pooled"]

    def init_state(self, fed: Federation) -> StrategyState:
        if fed.pooled is None:
            raise ConfigError("the centralised baseline needs the pooled site")
        return {"global": dict(fed.initial)}

    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        assert fed.pooled is not None
        current = _train(fed.pooled, state["global"], round_id, self.name)
        return {"global": current}, _info([fed.pooled])

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state["global"]]


def make_strategy(
    name: str,
    *,
    rounds: int,
    aggregator: str = "plain",
    aggregator_options: Mapping[str, Any] | None = None,
    fedprox_mu: float = 0.01,
    dropouts: Mapping[int, Sequence[str]] | None = None,
    server_optimizer: Mapping[str, Any] | None = None,
) -> Strategy:
    """The strategy called ``name`` (one of :data:`STRATEGIES`). ``server_optimizer`` (the
    ``strategy.server_optimizer`` table) applies to fedavg and fedprox, which aggregate.

    Errors: ConfigError for an unknown name or invalid options.
    """
    factories: dict[str, Callable[[], Strategy]] = {
        "fedavg": lambda: FedAvg(
            aggregator, aggregator_options, dropouts=dropouts, server_optimizer=server_optimizer
        ),
        "fedprox": lambda: FedProx(
            aggregator,
            aggregator_options,
            fedprox_mu=fedprox_mu,
            dropouts=dropouts,
            server_optimizer=server_optimizer,
        ),
        "cwt": CyclicWeightTransfer,
        "swt": lambda: SingleWeightTransfer(rounds),
        "ensemble": Ensemble,
        "local": LocalOnly,
        "centralized": Centralized,
    }
    if name not in factories:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    return factories[name]()
