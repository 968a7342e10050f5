"""Site-level DP-FedAvg (McMahan et al. 2018) on top of secure aggregation.

Each round, every site is sampled independently with probability ``q`` (``site_sample_rate``); a
sampled site trains from the global model, clips its whole update (the model delta) to ``clip`` in
L2 — clipped updates are counted and reported — and contributes it to the secure sum. The global
model moves by ``(sum + noise) / (q * n)`` (the fixed denominator of McMahan et al., which keeps
the sensitivity of the average at ``clip / (q n)``).

Two trust models:

* ``central``: the masked-sum aggregator (``secagg`` / ``secagg+`` / ``plain``) returns the exact sum
  of the clipped updates; the server then adds Gaussian noise of standard deviation
  ``noise_multiplier * clip`` to it. The server is trusted with the noise.
* ``distributed``: each site adds its share of discrete Gaussian or Skellam noise to its encoded
  update *before* masking (:mod:`secure_fl.privacy.distributed`), sized so that any ``threshold``
  survivors — the smallest number the secure-aggregation protocol accepts — together add the full
  noise. No party ever sees a less noisy aggregate.

Guarantee: each round is one application of a Gaussian(-equivalent) mechanism with multiplier
``noise_multiplier`` (distributed: :func:`effective_noise_multiplier` at the actual survivors) on the
sum of clipped updates, Poisson-subsampled over sites with rate ``q`` (central only: amplification
by subsampling is not established for the discrete mechanisms, so distributed runs use ``q = 1``).
The privacy unit is one institution's entire contribution to the round.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fl.aggregators import create as create_aggregator
from secure_fl.encoding import flatten, l2_clip, unflatten
from secure_fl.errors import ConfigError
from secure_fl.training.model import State, derive_seed, state_add, state_sub
from secure_fl.training.strategies import (
    Federation,
    RoundInfo,
    Strategy,
    StrategyState,
    _info,
    _train,
)


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

    def __post_init__(self) -> None:
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

    def init_state(self, fed: Federation) -> StrategyState:
        return {"global": dict(fed.initial)}

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state["global"]]

    def sampled_sites(self, fed: Federation, round_id: int) -> list[str]:
        """The sites sampled in ``round_id`` (Poisson with rate q; deterministic from the seed)."""
        if self.dp.sample_rate >= 1.0:
            return fed.names
        rng = np.random.default_rng(derive_seed(self.dp.seed, "site-sampling", round_id))
        draws = rng.random(len(fed.names))
        return [n for n, u in zip(fed.names, draws, strict=True) if u < self.dp.sample_rate]

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
        denominator = max(1.0, self.dp.sample_rate * len(fed.names))
        self.last_round = {"sampled": sampled, "survivors": 0, "clipped_updates": []}
        if not sampled:
            # Nobody sampled: the release is pure noise, as the analysis assumes.
            return self._noise_only(current, round_id, denominator), _info(
                list(fed.sites.values()), {"aggregator": "none", "included": [], "dropped": []}
            )
        deltas: dict[str, np.ndarray] = {}
        spec = None
        clipped: list[str] = []
        for name in sampled:
            local = _train(fed.sites[name], current, round_id, self.name)
            vector, spec = flatten(state_sub(local, current), site=name)
            vector, info = l2_clip(vector, self.dp.clip)
            if info.clipped:
                clipped.append(name)
            deltas[name] = vector
        assert spec is not None
        dropped = [s for s in self.dropouts.get(round_id, []) if s in deltas]
        if self.dp.trust == "central":
            total, report = self._central_sum(deltas, dropped, round_id)
        else:
            total, report = self._distributed_sum(deltas, dropped, round_id)
        survivors = [s for s in sampled if s not in dropped]
        update: State = dict(unflatten(total / denominator, spec))  # a mapping, as flattened
        report = {**report, "clipped_updates": clipped, "sampled": sampled}
        self.last_round = {
            "sampled": sampled,
            "survivors": len(survivors),
            "clipped_updates": clipped,
        }
        trained = [fed.sites[n] for n in sampled]
        return {"global": state_add(current, update)}, _info(trained, report)

    def _noise_rng(self, round_id: int) -> np.random.Generator:
        # Noise must be secret: fresh OS entropy, never the run seed.
        return np.random.default_rng(int.from_bytes(os.urandom(16), "big"))

    def _noise_only(self, current: State, round_id: int, denominator: float) -> StrategyState:
        rng = self._noise_rng(round_id)
        noisy = {
            k: (
                v + rng.normal(0.0, self.dp.noise_multiplier * self.dp.clip, v.shape) / denominator
            ).astype(np.float32)
            for k, v in current.items()
        }
        return {"global": noisy}

    def _central_sum(
        self, deltas: Mapping[str, np.ndarray], dropped: Sequence[str], round_id: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        survivors = [s for s in deltas if s not in dropped]
        if len(deltas) == 1 or self.aggregator_name == "plain":
            total = np.sum([deltas[s] for s in survivors], axis=0)
            report: dict[str, Any] = {"aggregator": "plain", "included": survivors}
        else:
            result = self.aggregator.aggregate(
                {s: [v] for s, v in deltas.items()}, None, dropped=dropped
            )
            total = np.asarray(result.mean[0], dtype=np.float64) * len(survivors)
            report = {k: v for k, v in result.report.items() if k != "site_seconds"}
        noise = self._noise_rng(round_id).normal(
            0.0, self.dp.noise_multiplier * self.dp.clip, total.shape
        )
        report["noise_std"] = self.dp.noise_multiplier * self.dp.clip
        return total + noise, report

    def _distributed_sum(
        self, deltas: Mapping[str, np.ndarray], dropped: Sequence[str], round_id: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        from secure_fl.privacy.distributed import (
            DistributedDPConfig,
            decode_sum,
            encode_site,
        )
        from secure_fl.secagg import Phase, make_config, run_round

        names = list(deltas)
        n = len(names)
        threshold = self.threshold(n)
        dim = next(iter(deltas.values())).size
        cfg = DistributedDPConfig(
            mechanism=self.dp.mechanism,
            clip=self.dp.clip,
            noise_multiplier=self.dp.noise_multiplier,
            threshold=threshold,
            num_sites=n,
            bits=self.dp.bits,
            dimension=dim,
        )
        rotation_seed = os.urandom(32)  # public per round, shared by the sites
        ids = {name: i + 1 for i, name in enumerate(names)}
        inputs = {}
        for name in names:
            share = encode_site(deltas[name], cfg, rotation_seed=rotation_seed)
            inputs[ids[name]] = share.values
        config = make_config(
            list(ids.values()),
            vector_length=cfg.padded_dimension,
            bits=cfg.bits,
            protocol="secagg+" if self.aggregator_name == "secagg+" else "secagg",
            round_id=round_id,
            threshold=threshold,
            dropout_rate=float(self.aggregator_options.get("dropout_rate", 0.1)),
            corrupt_fraction=float(self.aggregator_options.get("corrupt_fraction", 0.0)),
        )
        result = run_round(config, inputs, dropouts={ids[s]: Phase.MASKED_INPUT for s in dropped})
        decoded = decode_sum(
            result.total, cfg, rotation_seed=rotation_seed, survivors=len(result.survivors)
        )
        report = {
            "aggregator": f"{config.protocol}+{self.dp.mechanism}",
            "included": [n for n in names if ids[n] in result.survivors],
            "dropped": list(dropped),
            "threshold": config.threshold,
            "noise_threshold": threshold,
            "bits": cfg.bits,
            "padded_dimension": cfg.padded_dimension,
            "beyond_range": decoded.beyond_range,
            "noise_std": decoded.noise_std,
            "bytes_sent": {n: result.clients[ids[n]].bytes_sent for n in names},
        }
        return np.asarray(decoded.values, dtype=np.float64), report
