"""Site-level DP-FedAvg (McMahan et al. 2018) on top of secure aggregation.

Each round, every site is sampled independently with probability ``q`` (``site_sample_rate``,
drawn from the OS CSPRNG); a sampled site trains from the global model, clips its whole update (the model delta) to ``clip`` in
L2 — clipped updates are counted and reported — and contributes it to the secure sum. The global
model moves by ``(sum + noise) / (q * n)`` (the fixed denominator of McMahan et al., which keeps
the sensitivity of the average at ``clip / (q n)``).

Two trust models:

* ``central``: the masked-sum aggregator (``secagg`` / ``secagg+`` / ``plain``) returns the exact sum
  of the clipped updates; the server then adds Gaussian noise of standard deviation
  ``noise_multiplier * clip`` to it. The server is trusted with the noise.
* ``distributed``: each site adds its share of discrete Gaussian or Skellam noise to its encoded
  update *before* masking (:mod:`secure_fl.privacy.distributed`), sized so that any ``t - c``
  honest survivors together add the full noise, where ``t`` is the smallest number of survivors
  the secure-aggregation protocol accepts and ``c = ceil(corrupt_fraction * n)`` the sites that
  may collude with the server (and subtract their own shares). Refused when ``t - c < 1``.

Guarantee: each round is one application of a Gaussian(-equivalent) mechanism with multiplier
``noise_multiplier`` (distributed: :func:`effective_noise_multiplier` at the honest survivors) on
the sum of clipped updates of the sites that took part. **No amplification by site sampling is
claimed**: the server sees which sites take part, so each site is charged, with sampling rate 1,
for exactly the rounds it took part in (``q < 1`` lowers each site's spend, not the per-round
epsilon). The privacy unit is one institution's entire contribution to the round.

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
from secure_fl.errors import ConfigError
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
        # Only the count: who took part is not needed downstream (and no amplification is claimed).
        report = {**report, "clipped_updates": clipped, "sampled_count": len(sampled)}
        self.last_round = {
            "sampled": sampled,
            "survivors": len(survivors),
            "clipped_updates": clipped,
        }
        trained = [fed.sites[n] for n in sampled]
        return {"global": state_add(current, update)}, _info(trained, report)

    def _seeded_rng(self, *labels: object) -> np.random.Generator:
        digest = hashlib.sha256(repr(("secure_fl dp-fedavg", self.dp.seed, *labels)).encode())
        return np.random.default_rng(int.from_bytes(digest.digest()[:16], "big"))

    def _noise_rng(self, round_id: int, *labels: object) -> np.random.Generator:
        """A generator for DP noise: 128 fresh bits of OS entropy, or (``reproducible`` only)
        derived from the run seed, the round and ``labels``."""
        if self.dp.reproducible:
            return self._seeded_rng("noise", round_id, *labels)
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
        from secure_fl.privacy.distributed import decode_sum, encode_site
        from secure_fl.secagg import Phase, make_config, run_round

        names = list(deltas)
        n = len(names)
        threshold = self.threshold(n)
        honest, colluders = self.noise_threshold(n)
        cfg = self.distributed_config(n, next(iter(deltas.values())).size)
        # public per round, shared by the sites
        rotation_seed = (
            self._seeded_rng("rotation", round_id).bytes(32)
            if self.dp.reproducible
            else os.urandom(32)
        )
        ids = {name: i + 1 for i, name in enumerate(names)}
        inputs = {}
        for name in names:
            share = encode_site(
                deltas[name],
                cfg,
                rotation_seed=rotation_seed,
                rng=self._noise_rng(round_id, "site", name),
            )
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
            "noise_threshold": honest,
            "colluders": colluders,
            "bits": cfg.bits,
            "padded_dimension": cfg.padded_dimension,
            "beyond_range": decoded.beyond_range,
            "noise_std": decoded.noise_std,
            "bytes_sent": {n: result.clients[ids[n]].bytes_sent for n in names},
        }
        return np.asarray(decoded.values, dtype=np.float64), report
