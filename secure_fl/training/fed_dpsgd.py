"""Federated DP-SGD under secure aggregation (``privacy.level = "sample"`` with
``privacy.trust = "distributed"``).

Each round is ONE DP-SGD step of the global model over the pooled cohort of every site's
training patients:

1. every site Poisson-samples its training patients, each independently with rate ``q`` (drawn
   from the OS CSPRNG), computes one gradient per sampled patient on the global model, clips each
   to ``clip`` (C) in L2 and sums them (:func:`clipped_gradient_sum`);
2. the sums go through one SecAgg / SecAgg+ round in which every site adds its share of
   discrete Gaussian (or Skellam) noise to its fixed-point integers through the round layer's
   NoiseHook (:mod:`secure_fl.privacy.codec_noise`), sized so that any ``t - c`` honest
   survivors together add noise of std ``z * C`` to the pooled sum (:func:`secure_noisy_sum`);
3. the server decodes, divides by the expected pooled batch ``q * N`` (N: the pooled training
   cases) and takes a plain SGD step with ``train.lr`` (post-processing).

**Sensitivity.** One patient changes its site's sum by at most C; the site sends its sum
unclipped (its norm is at most ``n_max * C``, ``n_max`` the largest site's training cases, the
round's public ``l2_clip`` and ``clip_range``: never reached, so nothing is clipped). The hook is
configured for that bound ``B = n_max * C`` with nominal multiplier ``z * C / B``, which gives
every site the share ``z * C * w * 2**f / sqrt(t - c)`` (integer units): exactly the share of a
mechanism with sensitivity C and multiplier ``z``. The round's precision is chosen so that the
PATIENT-level scaled sensitivity ``C * w * 2**f`` passes the codec-noise rounding bound, which
makes :meth:`CodecNoiseConfig.effective_noise_multiplier` of the patient-level configuration
(``clip = C``, ``z``) a valid lower bound for the round (checked at every round).

**Accounting.** Each round is the Poisson-subsampled Gaussian with rate ``q`` over the pooled
cohort and multiplier ``z_eff`` (the Gaussian-equivalent multiplier of the discrete noise, a
lower bound); ``rounds`` steps in total; each site's patients are charged ``(q, z_eff, 1 step)``
per round. Caveat: the discrete noise is bounded by a Gaussian-equivalent RDP curve; applying the
subsampled-Gaussian amplification to it is the same approximation the DDG paper makes.

Randomness: the Poisson draws from :class:`secrets.SystemRandom`; the noise shares from
generators seeded with ``os.urandom`` (unless a named test seed is given).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from secure_fl.errors import ConfigError, ProtocolError
from secure_fl.privacy.codec_noise import CodecNoiseConfig, PlanParts
from secure_fl.training.model import State
from secure_fl.training.strategies import Federation, RoundInfo, Strategy, StrategyState

__all__ = [
    "FedDPSGD",
    "clipped_gradient_sum",
    "noise_configs",
    "nominal_for_effective",
    "poisson_sample",
    "pooled_sample_rate",
    "secagg_threshold",
    "secure_noisy_sum",
]

MODE = "federated DP-SGD"


def pooled_sample_rate(batch_size: int, pooled_cases: int) -> float:
    """``q = min(1, batch_size / pooled_cases)``: the per-patient rate over the pooled cohort.

    Errors: ConfigError when either is < 1."""
    if batch_size < 1 or pooled_cases < 1:
        raise ConfigError(
            f"train.batch_size and the pooled training cases must be >= 1, got {batch_size} "
            f"and {pooled_cases}"
        )
    return min(1.0, batch_size / pooled_cases)


def poisson_sample(n: int, q: float, *, rng: Callable[[], float] | None = None) -> list[int]:
    """The indices of ``n`` cases, each kept independently with probability ``q``, drawn from
    the OS CSPRNG (:class:`secrets.SystemRandom`; ``rng`` only in tests). May be empty.
    Errors: ConfigError when ``q`` is not in (0, 1] or ``n`` < 0."""
    if not 0.0 < q <= 1.0 or n < 0:
        raise ConfigError(f"poisson_sample: need q in (0, 1] and n >= 0, got q={q!r}, n={n!r}")
    draw = rng if rng is not None else secrets.SystemRandom().random
    return [i for i in range(n) if draw() < q]


def clipped_gradient_sum(
    network: Any,
    dataset: Any,
    indices: Sequence[int],
    *,
    loss_fn: Any,
    clip: float,
    device: Any = "cpu",
) -> tuple[dict[str, np.ndarray], int, float]:
    """Sum over ``indices`` of each case's gradient (trainable parameters only), each clipped to
    ``clip`` in L2 over all trainable parameters together.

    One backward pass per case (a patient is one case: the caller enforces one patch per case).
    Returns ``(sums by parameter name, cases clipped, mean loss)``; an empty ``indices`` gives
    zeros. Errors: ConfigError for ``clip`` <= 0, no trainable parameter, or a case that yields
    other than one patch (``preprocess.samples_per_volume`` != 1)."""
    import torch

    from secure_fl.training.dp_loop import CaseViews, collate_views

    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"privacy.clip must be a finite number > 0, got {clip!r}")
    params = [(k, p) for k, p in network.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("federated DP-SGD: the model has no trainable parameter")
    sums = {k: np.zeros(tuple(p.shape), dtype=np.float64) for k, p in params}
    views = CaseViews(dataset, 1)
    clipped, losses = 0, []
    network.train()
    for i in indices:
        batch = collate_views([views[int(i)]])
        if batch is None:  # pragma: no cover - one case gives one batch
            continue
        network.zero_grad(set_to_none=True)
        loss = loss_fn(network(batch["image"].to(device)), batch["label"].to(device))
        loss.backward()
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().cpu()
            for _, p in params
        ]
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped += int(factor < 1.0)
        for (k, _), g in zip(params, grads, strict=True):
            sums[k] += g.numpy() * factor
        losses.append(float(loss.detach()))
    network.zero_grad(set_to_none=True)
    return sums, clipped, float(np.mean(losses)) if losses else float("nan")


def noise_configs(
    *,
    mechanism: str,
    clip: float,
    noise_multiplier: float,
    bound: float,
    num_sites: int,
    threshold: int,
    colluders: int,
    dimension: int,
) -> tuple[CodecNoiseConfig, CodecNoiseConfig]:
    """``(patient, hook)``: the patient-level configuration (``clip = C``, multiplier ``z``: its
    :meth:`~CodecNoiseConfig.effective_noise_multiplier` is what the ledger records) and the
    configuration the sites' hooks run (``clip = bound``, multiplier ``z * C / bound``: the same
    per-site share for sums of norm up to ``bound``). Errors: ConfigError for ``bound < clip`` or
    any out-of-range field (naming it)."""
    if not bound >= clip:
        raise ConfigError(f"the sum bound {bound!r} must be >= privacy.clip={clip!r}")
    honest = threshold - colluders
    patient = CodecNoiseConfig(
        mechanism=mechanism,
        clip=clip,
        noise_multiplier=noise_multiplier,
        honest_threshold=honest,
        threshold=threshold,
        colluders=colluders,
        num_sites=num_sites,
        dimension=dimension,
    )
    hook = dataclasses.replace(
        patient, clip=bound, noise_multiplier=noise_multiplier * clip / bound
    )
    return patient, hook


def secagg_threshold(num_sites: int, options: Mapping[str, Any]) -> tuple[int, int]:
    """``(t, c)``: the SecAgg threshold of a round of ``num_sites`` with aggregation ``options``
    (``threshold`` or the one chosen from ``dropout_rate`` / ``corrupt_fraction``) and the
    colluders ``c``. Errors: ConfigError when ``t - c < 1``."""
    from secure_fl.privacy.distributed import honest_noise_threshold
    from secure_fl.secagg import secagg_parameters

    corrupt = float(options.get("corrupt_fraction", 0.0))
    rate = float(options.get("dropout_rate", 0.1))
    t = int(
        options.get("threshold")
        or secagg_parameters(num_sites, dropout_rate=rate, corrupt_fraction=corrupt).threshold
    )
    return t, honest_noise_threshold(t, num_sites, corrupt)[1]


def nominal_for_effective(target: float, effective: Callable[[float], float]) -> float:
    """The smallest nominal multiplier (to 1e-9 relative) whose ``effective`` multiplier is at
    least ``target``. Errors: ConfigError when none up to 1e6 * target is."""
    if not target > 0:
        raise ConfigError(f"the noise multiplier must be > 0, got {target!r}")
    low, high = target, target
    while effective(high) < target:
        low, high = high, high * 2.0
        if high > 1e6 * target:
            raise ConfigError(f"no nominal noise reaches the effective multiplier {target:g}")
    if effective(low) >= target:
        return low
    while (high - low) > 1e-9 * high:
        mid = (low + high) / 2.0
        low, high = (low, mid) if effective(mid) >= target else (mid, high)
    return high


def _round_options(*, clip: float, bound: float, num_sites: int, dimension: int) -> dict[str, Any]:
    """The codec options of the round: 64 bits, ``clip_range = l2_clip = bound`` and the coarsest
    precision whose patient-level scaled clip ``C * 2**f / n`` passes the rounding bound
    (``>= sqrt(D) / 0.01``)."""
    need = num_sites * math.sqrt(dimension) / (0.01 * clip)
    frac_bits = max(0, math.ceil(math.log2(need)))
    return {"bits": 64, "clip_range": bound, "l2_clip": bound, "precision": 2.0**-frac_bits}


def secure_noisy_sum(
    sums: Mapping[str, np.ndarray],
    *,
    aggregator: str,
    aggregator_options: Mapping[str, Any] | None,
    clip: float,
    noise_multiplier: float,
    bound: float,
    mechanism: str = "discrete_gaussian",
    round_id: int = 0,
    dropped: Sequence[str] = (),
    seed: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The pooled sum of the sites' flat clipped-gradient sums plus distributed noise of std
    ``noise_multiplier * clip`` (at least, from the ``t - c`` honest survivors), through one
    SecAgg / SecAgg+ round of the round layer (module docstring).

    Guarantee: the server sees only the modular sum of the survivors' noised shares; every
    site's hook checks the plan (PolicyError before sending). ``seed``: named test seed only
    (default: fresh ``os.urandom`` per site). Returns ``(total, report)``; ``report["dp_event"]``
    carries ``noise_multiplier`` (the effective patient-level one), ``nominal_noise_multiplier``,
    ``survivors``, ``threshold``, ``honest_survivors``. Errors: ConfigError for a norm above
    ``bound``, an aggregator other than secagg / secagg+, or fewer than 2 sites; ThresholdError
    when too few survive."""
    from secure_fl.aggregators import create as create_aggregator
    from secure_fl.aggregators.dp import DistributedNoise
    from secure_fl.aggregators.masked import MaskedAggregator

    if aggregator not in ("secagg", "secagg+"):
        raise ConfigError(
            f"{MODE} needs aggregation.name 'secagg' or 'secagg+', got {aggregator!r}"
        )
    n = len(sums)
    if n < 2:
        raise ConfigError(f"{MODE} needs at least 2 sites under secure aggregation, got {n}")
    for site, vector in sums.items():
        if float(np.linalg.norm(vector)) > bound * (1 + 1e-9):
            raise ConfigError(f"site {site}: the gradient sum exceeds the bound {bound:g}")
    options = dict(aggregator_options or {})
    threshold, colluders = secagg_threshold(n, options)
    honest = threshold - colluders
    dim = int(next(iter(sums.values())).size)
    patient, hook_cfg = noise_configs(
        mechanism=mechanism,
        clip=clip,
        noise_multiplier=noise_multiplier,
        bound=bound,
        num_sites=n,
        threshold=threshold,
        colluders=colluders,
        dimension=dim,
    )
    codec = _round_options(clip=clip, bound=bound, num_sites=n, dimension=dim)
    inner = create_aggregator(aggregator, **{**options, **codec, "threshold": threshold})
    if not isinstance(inner, MaskedAggregator):  # pragma: no cover - checked above
        raise ConfigError("secure aggregation expected")
    # The patient-level configuration must accept the round too (rounding bound at C, ring,
    # sampler range): only then is its effective multiplier a valid lower bound.
    frac_bits = round(-math.log2(inner.spec.precision))
    patient.check_plan(
        PlanParts(
            bits=64,
            frac_bits=frac_bits,
            max_abs_sum=int(bound * 2.0**frac_bits) + 1,
            max_weight=1.0 / n,
            num_sites=n,
            l2_clip=clip,
        )
    )
    wrapper = DistributedNoise(inner, hook_cfg, seed=seed, colluders=colluders, round_id=round_id)
    result = wrapper.aggregate({s: [np.asarray(v)] for s, v in sums.items()}, None, dropped=dropped)
    if result.event is None:  # pragma: no cover - the wrapper always reports its event
        raise ProtocolError("the distributed-noise round reported no event")
    survivors = result.event.survivors
    total = np.asarray(result.mean[0], dtype=np.float64).ravel() * survivors
    effective = patient.effective_noise_multiplier()
    event = {
        "mechanism": mechanism,
        "trust": "distributed",
        "noise_multiplier": effective,
        "nominal_noise_multiplier": noise_multiplier,
        "clip": clip,
        "noise_std": noise_multiplier * clip * math.sqrt(survivors / honest),
        "survivors": survivors,
        "threshold": threshold,
        "honest_survivors": honest,
        "colluders": colluders,
        "noise_source": result.event.noise_source,
    }
    report = {k: v for k, v in result.report.items() if k not in ("noise_std", "clipped_updates")}
    return total, {**report, "mode": MODE, "dp_event": event}


class FedDPSGD(Strategy):
    """Federated DP-SGD (module docstring): one global DP-SGD step per round.

    ``noise_multiplier`` is the NOMINAL ``z`` of the shares (set by the privacy bookkeeping so
    that the effective one meets the target); ``lr`` the server's SGD step size per round
    (``lr(round_id)``); ``sample_rate`` the pooled ``q``.
    """

    name = "fedavg"

    def __init__(
        self,
        *,
        clip: float,
        noise_multiplier: float,
        sample_rate: float,
        lr: Callable[[int], float],
        aggregator: str = "secagg+",
        aggregator_options: Mapping[str, Any] | None = None,
        mechanism: str = "discrete_gaussian",
        dropouts: Mapping[int, Sequence[str]] | None = None,
        seed: int | None = None,
    ) -> None:
        self.clip, self.noise_multiplier, self.sample_rate = clip, noise_multiplier, sample_rate
        self.lr, self.mechanism, self.seed = lr, mechanism, seed
        self.aggregator, self.aggregator_options = aggregator, dict(aggregator_options or {})
        self.dropouts = {int(k): list(v) for k, v in (dropouts or {}).items()}
        self.last_round: dict[str, Any] = {}

    def init_state(self, fed: Federation) -> StrategyState:
        return {"global": dict(fed.initial)}

    def eval_states(self, fed: Federation, state: StrategyState, site: str) -> list[State]:
        return [state["global"]]

    def run_round(
        self, fed: Federation, state: StrategyState, round_id: int
    ) -> tuple[StrategyState, RoundInfo]:
        from secure_fl.training.model import set_state

        current: State = state["global"]
        counts = {name: fed.sites[name].num_train_cases for name in fed.names}
        bound = max(counts.values()) * self.clip
        flat: dict[str, np.ndarray] = {}
        keys: list[tuple[str, tuple[int, ...]]] = []
        clipped = 0
        for name in fed.names:
            site = fed.sites[name]
            site.initialize()
            set_state(site.network, current)
            draw = poisson_sample(counts[name], self.sample_rate)
            sums, n_clipped, loss = clipped_gradient_sum(
                site.network,
                site.train_ds,
                draw,
                loss_fn=site.loss_fn,
                clip=self.clip,
                device=site.device,
            )
            keys = [(k, v.shape) for k, v in sums.items()]
            flat[name] = np.concatenate([v.ravel() for v in sums.values()])
            clipped += n_clipped
            del loss  # the un-noised loss of the sampled patients is never released
            site.last_steps, site.last_loss = 1, float("nan")
        total, report = secure_noisy_sum(
            flat,
            aggregator=self.aggregator,
            aggregator_options=self.aggregator_options,
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            bound=bound,
            mechanism=self.mechanism,
            round_id=round_id,
            dropped=[s for s in self.dropouts.get(round_id, []) if s in flat],
            # a named (research) seed is varied per round: the same noise twice would cancel
            seed=None if self.seed is None else (abs(self.seed) << 32) + round_id,
        )
        gradient = total / (self.sample_rate * sum(counts.values()))
        lr = self.lr(round_id)
        new = dict(current)
        offset = 0
        for key, shape in keys:
            size = int(np.prod(shape))
            step = gradient[offset : offset + size].reshape(shape)
            new[key] = (current[key] - lr * step).astype(current[key].dtype)
            offset += size
        event = report["dp_event"]
        self.last_round = {"survivors": event["survivors"], "dp_event": event}
        report = {**report, "clipped_cases": clipped}
        return {"global": new}, RoundInfo(float("nan"), 1, report)
