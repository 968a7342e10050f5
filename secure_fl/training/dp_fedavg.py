"""Site-level DP-FedAvg (McMahan et al. 2018) on top of secure aggregation.

Each round, every site is sampled independently with probability ``q`` (``site_sample_rate``,
drawn from the OS CSPRNG); a sampled site trains from the global model, clips its whole update
(the model delta) to ``clip`` in L2 — clipped updates are counted and reported — and
contributes it to the secure sum. The global model moves by ``(sum + noise) / (q * n)`` (the
fixed denominator of McMahan et al., which keeps the sensitivity of the average at
``clip / (q n)``).

Two trust models, each a DP wrapper of :mod:`secure_fl.aggregators.dp` around the aggregator
(this module keeps no secure-aggregation recipe of its own):

* ``central`` (:class:`~secure_fl.aggregators.dp.CentralGaussian`): the masked-sum aggregator
  (``secagg`` / ``secagg+`` / ``plain``) returns the exact sum of the clipped updates; the server
  then adds Gaussian noise of standard deviation ``noise_multiplier * clip`` to it. The server
  is trusted with the noise.
* ``distributed`` (:class:`~secure_fl.aggregators.dp.DistributedNoise`): each site adds its
  share of discrete Gaussian or Skellam noise to its encoded update *before* masking
  (:mod:`secure_fl.privacy.distributed`), sized so that any ``t - c``
  honest survivors together add the full noise, where ``t`` is the smallest number of survivors
  the secure-aggregation protocol accepts and ``c = ceil(corrupt_fraction * n)`` the sites that
  may collude with the server (and subtract their own shares). Refused when ``t - c < 1``.

Guarantee: each round is one application of a Gaussian(-equivalent) mechanism with multiplier
``noise_multiplier`` (distributed: :func:`effective_noise_multiplier` at the honest survivors) on
the sum of clipped updates of the sites that took part. **No amplification by site sampling is
claimed**: the server sees which sites take part, so each site is charged, with sampling rate 1,
for exactly the rounds it took part in (``q < 1`` lowers each site's spend, not the per-round
epsilon). The privacy unit is one institution's entire contribution to the round.

Fine-tuning (``train.trainable``): with central noise, only the trainable entries of the model
state are flattened, clipped and noised (every other entry must come back from the sites
unchanged - a site that changed a frozen parameter is refused, it would leave the mechanism
unnoised), so the mechanism's dimension is the trainable ``d`` and the frozen pretrained weights
receive no noise. With distributed noise the whole state is still released (the noise plan of
:mod:`secure_fl.training.privacy_run` is sized for the full model).

Randomness: participation, the central noise, the sites' distributed noise and the rotation come
from the OS CSPRNG; ``SiteDP(reproducible=True)`` (``privacy.reproducible_noise``, research runs
only) derives them from the run seed instead, which makes the noise predictable from
``config.json``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_fl.aggregators import create as create_aggregator
from secure_fl.encoding import flatten, l2_clip, unflatten
from secure_fl.errors import ConfigError, ProtocolError
from secure_fl.training.model import State, state_add, state_sub
from secure_fl.training.strategies import (
    Federation,
    RoundInfo,
    Strategy,
    StrategyState,
    _info,
    _train,
)

if TYPE_CHECKING:
    from secure_fl.privacy.distributed import DistributedDPConfig


@dataclass(frozen=True)
class SiteDP:
    """Site-level DP settings of a run (see the module docstring)."""

    noise_multiplier: float
    clip: float
    sample_rate: float = 1.0
    trust: str = "central"
    mechanism: str = "gaussian"
    bits: int = 32
    seed: int = 0
    reproducible: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.reproducible, bool):
            raise ConfigError(
                f"privacy.reproducible_noise must be true or false, got {self.reproducible!r}"
            )
        if self.noise_multiplier < 0 or self.clip <= 0:
            raise ConfigError("privacy.noise_multiplier must be >= 0 and privacy.clip > 0")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"privacy.site_sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.trust == "distributed" and self.sample_rate != 1.0:
            raise ConfigError(
                "privacy.site_sample_rate must be 1 with trust='distributed': amplification by "
                "sampling is not established for the discrete mechanisms"
            )


class DPFedAvg(Strategy):
    """FedAvg with site-level differential privacy (central or distributed noise)."""

    name = "fedavg"

    def __init__(
        self,
        dp: SiteDP,
        aggregator: str = "secagg+",
        aggregator_options: Mapping[str, Any] | None = None,
        *,
        dropouts: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        self.dp = dp
        self.aggregator_name = aggregator
        self.aggregator_options = dict(aggregator_options or {})
        self.aggregator = create_aggregator(aggregator, **self.aggregator_options)
        self.dropouts = {int(k): list(v) for k, v in (dropouts or {}).items()}
        self.last_round: dict[str, Any] = {}
        self._participants: dict[int, list[str]] = {}
        self._frozen: frozenset[str] | None = None

    def frozen_keys(self, fed: Federation) -> frozenset[str]:
        """The state entries outside the DP mechanism: the parameters ``train.trainable``
        freezes at the sites (none without ``trainable``, and none with distributed noise -
        see the module docstring). Read once from the first site's network (built if needed);
        a site object without a network (a remote site) freezes nothing."""
        if self._frozen is None:
            frozen: frozenset[str] = frozenset()
            trainer = fed.sites[fed.names[0]] if fed.names else None
            trainable = getattr(getattr(trainer, "train_config", None), "trainable", ())
            if trainer is not None and trainable and self.dp.trust == "central":
                if getattr(trainer, "network", None) is None:
                    trainer.initialize()
                frozen = frozenset(
                    name
                    for name, param in trainer.network.named_parameters()
                    if not param.requires_grad
                )
            self._frozen = frozen
        return self._frozen

    def init_state(self, fed: Federation) -> StrategyState:
        return {"global": dict(fed.initial)}

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state["global"]]

    def sampled_sites(self, fed: Federation, round_id: int) -> list[str]:
        """The sites taking part in ``round_id``: each independently with probability q.

        Drawn once per round (the privacy bookkeeping asks before the round, to charge exactly the
        participants; the round then uses the same draw) from the OS CSPRNG, or from the run seed
        with ``reproducible``. No amplification is claimed from it (module docstring).
        """
        if self.dp.sample_rate >= 1.0:
            return list(fed.names)
        if round_id not in self._participants:
            if self.dp.reproducible:
                rng = self._seeded_rng("site-sampling", round_id)
                draws = [float(u) for u in rng.random(len(fed.names))]
            else:
                system = secrets.SystemRandom()
                draws = [system.random() for _ in fed.names]
            self._participants[round_id] = [
                n for n, u in zip(fed.names, draws, strict=True) if u < self.dp.sample_rate
            ]
        return list(self._participants[round_id])

    def noise_threshold(self, n_sites: int) -> tuple[int, int]:
        """``(t - c, c)``: the honest survivors distributed noise is sized for, and the colluders
        ``c = ceil(corrupt_fraction * n_sites)`` (ConfigError when ``t - c < 1``)."""
        from secure_fl.privacy.distributed import honest_noise_threshold

        corrupt = float(self.aggregator_options.get("corrupt_fraction", 0.0))
        return honest_noise_threshold(self.threshold(n_sites), n_sites, corrupt)

    def threshold(self, n_sites: int) -> int:
        """The smallest number of survivors the secure-aggregation round accepts."""
        from secure_fl.secagg import secagg_parameters

        if n_sites < 2:
            return 1
        rate = float(self.aggregator_options.get("dropout_rate", 0.1))
        corrupt = float(self.aggregator_options.get("corrupt_fraction", 0.0))
        return int(
            self.aggregator_options.get("threshold")
            or secagg_parameters(n_sites, dropout_rate=rate, corrupt_fraction=corrupt).threshold
        )

    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        current = state["global"]
        sampled = self.sampled_sites(fed, round_id)
        self._participants.pop(round_id, None)
        denominator = max(1.0, self.dp.sample_rate * len(fed.names))
        self.last_round = {"sampled": sampled, "survivors": 0, "clipped_updates": []}
        if not sampled:
            # Nobody sampled: the release is pure noise, as the analysis assumes.
            return self._noise_only(current, round_id, denominator, fed), _info(
                list(fed.sites.values()), {"aggregator": "none", "included": [], "dropped": []}
            )
        deltas: dict[str, np.ndarray] = {}
        spec = None
        clipped: list[str] = []
        for name in sampled:
            local = _train(fed.sites[name], current, round_id, self.name)
            delta = state_sub(local, current)
            frozen = self.frozen_keys(fed)
            moved = sorted(k for k in frozen if k in delta and np.any(delta[k] != 0))
            if moved:
                raise ProtocolError(
                    f"site {name} changed parameters that train.trainable freezes "
                    f"({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}); refusing "
                    "to release them outside the DP mechanism"
                )
            delta = {k: v for k, v in delta.items() if k not in frozen}
            vector, spec = flatten(delta, site=name)
            vector, info = l2_clip(vector, self.dp.clip)
            if info.clipped:
                clipped.append(name)
            deltas[name] = vector
        if spec is None:  # pragma: no cover - sampled is not empty
            raise ConfigError("no site was trained")
        dropped = [s for s in self.dropouts.get(round_id, []) if s in deltas]
        if self.dp.trust == "central":
            total, report = self._central_sum(deltas, dropped, round_id)
        else:
            total, report = self._distributed_sum(deltas, dropped, round_id)
        survivors = [s for s in sampled if s not in dropped]
        update: State = dict(unflatten(total / denominator, spec))  # the DP'd entries only
        # Only the count: who took part is not needed downstream (and no amplification is claimed).
        report = {**report, "clipped_updates": clipped, "sampled_count": len(sampled)}
        self.last_round = {
            "sampled": sampled,
            "survivors": len(survivors),
            "clipped_updates": clipped,
            "dp_event": report.get("dp_event"),  # the wrapper's DPEvent: the ledger confirms it
            "dp_dimension": int(total.size),
        }
        trained = [fed.sites[n] for n in sampled]
        moved_state = state_add({k: current[k] for k in update}, update)
        return {"global": {k: moved_state.get(k, v) for k, v in current.items()}}, _info(
            trained, report
        )

    def _seeded_rng(self, *labels: object) -> np.random.Generator:
        digest = hashlib.sha256(repr(("secure_fl dp-fedavg", self.dp.seed, *labels)).encode())
        return np.random.default_rng(int.from_bytes(digest.digest()[:16], "big"))

    def _noise_rng(self, round_id: int, *labels: object) -> np.random.Generator:
        """A generator for DP noise: 128 fresh bits of OS entropy, or (``reproducible`` only)
        derived from the run seed, the round and ``labels``."""
        if self.dp.reproducible:
            return self._seeded_rng("noise", round_id, *labels)
        return np.random.default_rng(int.from_bytes(os.urandom(16), "big"))

    def _noise_only(
        self, current: State, round_id: int, denominator: float, fed: Federation
    ) -> StrategyState:
        rng = self._noise_rng(round_id)
        frozen = self.frozen_keys(fed)
        std = self.dp.noise_multiplier * self.dp.clip
        noisy = {
            k: v
            if k in frozen
            else (v + rng.normal(0.0, std, v.shape) / denominator).astype(np.float32)
            for k, v in current.items()
        }
        return {"global": noisy}

    def _noise_seed(self, round_id: int, label: str) -> int | None:
        """None (fresh OS entropy in the wrapper), or with ``reproducible`` a seed derived from
        the run seed, the round and ``label``."""
        if not self.dp.reproducible:
            return None
        return int(self._seeded_rng(label, round_id).integers(0, 2**63 - 1))

    def _central_sum(
        self, deltas: Mapping[str, np.ndarray], dropped: Sequence[str], round_id: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The survivors' clipped sum plus Gaussian noise of std ``noise_multiplier * clip``
        (:class:`~secure_fl.aggregators.dp.CentralGaussian` around the secure aggregator)."""
        from secure_fl.aggregators.dp import CentralGaussian
        from secure_fl.aggregators.plain import PlainAggregator

        plain = len(deltas) == 1 or self.aggregator_name == "plain"
        inner = PlainAggregator() if plain else self.aggregator
        wrapper = CentralGaussian(
            inner,
            clip=self.dp.clip,
            noise_multiplier=self.dp.noise_multiplier,
            seed=self._noise_seed(round_id, "noise"),
        )
        result = wrapper.aggregate({s: [v] for s, v in deltas.items()}, None, dropped=dropped)
        survivors = [s for s in deltas if s not in dropped]
        total = np.asarray(result.mean[0], dtype=np.float64) * len(survivors)
        if plain:
            report: dict[str, Any] = {"aggregator": "plain", "included": survivors}
        else:
            report = {k: v for k, v in result.report.items() if k != "site_seconds"}
        if result.event is None:  # pragma: no cover - the wrapper always reports its event
            raise ConfigError("the DP wrapper reported no event")
        report["noise_std"] = result.event.noise_std
        report["dp_event"] = result.event.to_dict()
        return total, report

    def distributed_config(self, n_sites: int, dimension: int) -> DistributedDPConfig:
        """The distributed-noise plan of a round of ``n_sites``: noise sized so that the ``t - c``
        honest survivors (:meth:`noise_threshold`) together add the full noise.

        Errors: ConfigError when ``t - c < 1`` or the ring cannot hold the planned sum.
        """
        from secure_fl.privacy.distributed import DistributedDPConfig

        honest, _ = self.noise_threshold(n_sites)
        return DistributedDPConfig(
            mechanism=self.dp.mechanism,
            clip=self.dp.clip,
            noise_multiplier=self.dp.noise_multiplier,
            threshold=honest,  # the noise must survive c colluders subtracting their shares
            num_sites=n_sites,
            bits=self.dp.bits,
            dimension=dimension,
        )

    def _distributed_sum(
        self, deltas: Mapping[str, np.ndarray], dropped: Sequence[str], round_id: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The survivors' clipped sum plus distributed noise
        (:class:`~secure_fl.aggregators.dp.DistributedNoise` around SecAgg / SecAgg+)."""
        from secure_fl.aggregators.dp import DistributedNoise

        n = len(deltas)
        _, colluders = self.noise_threshold(n)
        cfg = self.distributed_config(n, next(iter(deltas.values())).size)
        inner = create_aggregator(
            self.aggregator_name, **{**self.aggregator_options, "threshold": self.threshold(n)}
        )
        wrapper = DistributedNoise(
            inner,
            cfg,
            seed=self._noise_seed(round_id, "distributed"),
            colluders=colluders,
            round_id=round_id,
        )
        result = wrapper.aggregate({s: [v] for s, v in deltas.items()}, None, dropped=dropped)
        if result.event is None:  # pragma: no cover - the wrapper always reports its event
            raise ConfigError("the DP wrapper reported no event")
        total = np.asarray(result.mean[0], dtype=np.float64) * result.event.survivors
        report = {**result.report, "dropped": list(dropped), "dp_event": result.event.to_dict()}
        return total, report
