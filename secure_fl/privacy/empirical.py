"""Empirical privacy audit in one run: canaries, a guessing game, a lower bound on epsilon.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023), applied
to site-level DP-FedAvg as Andrew et al. (2023, "One-shot empirical privacy estimation for
federated learning") do: ``m`` canary clients, each included independently with probability 1/2,
contribute a fixed update (of L2 norm ``clip``) in every round; after the last round each canary
is scored by the alignment of the final model delta with its update, the ``k`` highest-scoring
are guessed "included" and the ``k`` lowest "excluded", and the number ``v`` of correct guesses
among the ``r = 2k`` is turned into a lower bound on epsilon: the largest epsilon for which an
(epsilon, delta)-DP mechanism could produce ``v`` or more correct guesses with probability at
least ``1 - confidence`` (the paper's Theorem 5.2 bound with the binomial tail, its Algorithm in
:func:`epsilon_lower_bound`). If the lower bound exceeds the accounted epsilon, the mechanism
that ran is **not** as private as the ledger says: the audit flags it.

What this audits - said plainly: **the mechanism implementation, not the whole training
pipeline.** :func:`audit_gaussian_sum` runs secure_fl's own DP-FedAvg noise code
(:class:`secure_fl.aggregators.dp.CentralGaussian`: clip every update, sum, add Gaussian noise
of std ``noise_multiplier * clip``, exactly the call :class:`secure_fl.training.dp_fedavg.DPFedAvg`
makes with central trust) on a synthetic vector federation: the canaries plus a few background
sites with random updates, with the clip, the per-round noise multipliers and the number of
rounds of the audited run (read from its ledger by :func:`empirical_audit_run`). It catches a
noise that is switched off, mis-scaled or applied to the wrong vector, or a clip that does not
bound the sensitivity; it cannot see a bug in the 3D-UNet training, data loading or in how the
ledger was written beyond those parameters. Canaries are scaled standard basis vectors (exactly
orthogonal, so their scores do not interfere), the white-box choice the auditor may make.

One-run audits are loose by design: with correctly calibrated noise the bound is far *below* the
accounted epsilon (it is a 95 %-confidence lower bound, not an estimate); its job is to expose an
implementation that adds less noise than it claims. Distributed-trust (discrete Gaussian /
Skellam under SecAgg) and sample-level DP-SGD runs are not audited here (ConfigError).

Randomness: canary inclusion and the mechanism's noise come from the OS CSPRNG unless ``seed`` is
given (tests only: a seeded audit is reproducible, not private - it protects nothing).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_fl.errors import ConfigError

if TYPE_CHECKING:
    from secure_fl.aggregators.base import Aggregator

#: Builds the mechanism under audit from (clip, noise_multiplier) (default: CentralGaussian).
MechanismFactory = Callable[[float, float], "Aggregator"]

DEFAULT_CANARIES = 1000
DEFAULT_GUESSES = 400
DEFAULT_CONFIDENCE = 0.95


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Steinke et al.'s bound on P[at least ``v`` of ``r`` guesses correct] for an
    (``epsilon``, ``delta``)-DP mechanism with ``m`` canaries included with probability 1/2:
    ``P[Bin(r, e^eps/(1+e^eps)) >= v] + 2 m delta max_i P[v > Bin >= v - i] / i``, capped at 1.

    Errors: ConfigError unless ``0 <= v <= r <= m``, ``epsilon >= 0`` and ``0 <= delta <= 1``.
    """
    from scipy.stats import binom

    _check_counts(m, r, v)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ConfigError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not 0.0 <= delta <= 1.0:
        raise ConfigError(f"delta must be in [0, 1], got {delta!r}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))
    alpha = 0.0
    if v > 0 and delta > 0:
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v - i], i = 1..v
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon (to 1e-6) rejected at level ``1 - confidence`` by :func:`p_value`:
    with probability >= ``confidence`` over the canaries' inclusion, an (epsilon, delta)-DP
    mechanism would not have produced ``v`` correct guesses out of ``r`` for any epsilon below
    the returned value. 0.0 when the guesses are no evidence at all.

    Errors: ConfigError for counts out of range or ``confidence`` outside (0, 1).
    """
    _check_counts(m, r, v)
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, high * 2
        if high > 1e3:  # v = r with delta = 0: unbounded evidence; never reached with delta > 0
            return low
    while high - low > 1e-6:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < level:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class EmpiricalAudit:
    """The outcome of one empirical audit (one run of the mechanism with canaries).

    ``lower_bound``: epsilon lower bound at ``confidence``; ``accounted_epsilon``: what the
    accountant (ledger) claims at ``delta``; ``flagged``: the lower bound exceeds it (the
    implementation is less private than accounted). ``canaries`` m, ``guesses`` r, ``correct`` v;
    ``noise_multipliers`` per round, ``clip``; ``mechanism`` names what ran; ``seeded``: the audit
    used a named seed (tests).
    """

    lower_bound: float
    accounted_epsilon: float | None
    delta: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    clip: float
    noise_multipliers: tuple[float, ...]
    mechanism: str
    seeded: bool = False

    @property
    def rounds(self) -> int:
        """The number of aggregation rounds the audited mechanism ran."""
        return len(self.noise_multipliers)

    @property
    def flagged(self) -> bool:
        """True when the lower bound exceeds the accounted epsilon."""
        return self.accounted_epsilon is not None and self.lower_bound > self.accounted_epsilon

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with ``rounds`` and ``flagged``."""
        out = asdict(self)
        out["noise_multipliers"] = list(self.noise_multipliers)
        out["rounds"] = self.rounds
        out["flagged"] = self.flagged
        return out

    def summary(self) -> str:
        """One line: the bound beside the accounted epsilon, and the verdict."""
        acc = "?" if self.accounted_epsilon is None else f"{self.accounted_epsilon:.3f}"
        verdict = "FLAGGED (bound above accounted)" if self.flagged else "consistent"
        return (
            f"empirical epsilon >= {self.lower_bound:.3f} at {self.confidence:.0%} confidence "
            f"(accounted {acc}, delta {self.delta:g}; {self.correct}/{self.guesses} guesses "
            f"correct, {self.canaries} canaries, {self.rounds} rounds): {verdict}"
        )


def central_gaussian(seed: int | None = None) -> MechanismFactory:
    """The DP-FedAvg central mechanism as :class:`DPFedAvg` builds it (``seed``: tests only)."""

    def build(clip: float, noise_multiplier: float) -> Aggregator:
        from secure_fl.aggregators.dp import CentralGaussian
        from secure_fl.aggregators.plain import PlainAggregator

        return CentralGaussian(
            PlainAggregator(), clip=clip, noise_multiplier=noise_multiplier, seed=seed
        )

    return build


def audit_gaussian_sum(
    *,
    clip: float,
    noise_multipliers: Sequence[float],
    delta: float,
    accounted_epsilon: float | None,
    canaries: int = DEFAULT_CANARIES,
    guesses: int = DEFAULT_GUESSES,
    confidence: float = DEFAULT_CONFIDENCE,
    background_sites: int = 4,
    mechanism: MechanismFactory | None = None,
    seed: int | None = None,
) -> EmpiricalAudit:
    """Run the site-level mechanism (one aggregation per entry of ``noise_multipliers``) on
    ``canaries`` canary sites, each included in every round with probability 1/2, plus
    ``background_sites`` sites with random updates of norm ``clip``; guess ``guesses / 2``
    included and as many excluded; return the one-run lower bound beside ``accounted_epsilon``.

    ``mechanism`` builds the aggregator under audit from (clip, noise_multiplier) (default
    :func:`central_gaussian`: secure_fl's CentralGaussian around the plain sum). Guarantee: when
    the mechanism is (accounted_epsilon, delta)-DP per site, ``flagged`` is False with
    probability >= ``confidence``.

    Errors: ConfigError for ``clip`` not > 0, no rounds or a negative multiplier, ``canaries``
    < 2, ``guesses`` not even or not in [2, canaries], ``background_sites`` < 0, ``delta`` or
    ``confidence`` outside (0, 1).
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"clip must be a finite number > 0, got {clip!r}")
    zs = tuple(float(z) for z in noise_multipliers)
    if not zs or any(not (math.isfinite(z) and z >= 0) for z in zs):
        raise ConfigError(f"noise_multipliers must be >= 1 finite numbers >= 0, got {zs!r}")
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ConfigError(f"canaries must be an integer >= 2, got {canaries!r}")
    if (
        isinstance(guesses, bool)
        or not isinstance(guesses, int)
        or guesses % 2
        or not 2 <= guesses <= canaries
    ):
        raise ConfigError(
            f"guesses must be an even integer in [2, canaries={canaries}], got {guesses!r}"
        )
    if isinstance(background_sites, bool) or not isinstance(background_sites, int):
        raise ConfigError(f"background_sites must be an integer >= 0, got {background_sites!r}")
    if background_sites < 0:
        raise ConfigError(f"background_sites must be an integer >= 0, got {background_sites!r}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    build = mechanism or central_gaussian(seed)
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(16), "big"))
    dim = canaries + 16
    included = rng.random(canaries) < 0.5
    members = [i for i in range(canaries) if included[i]]
    background = {
        f"site-{j}": (lambda v: v * (clip / float(np.linalg.norm(v))))(rng.standard_normal(dim))
        for j in range(background_sites)
    }
    total = np.zeros(dim)
    for z in zs:
        updates: dict[str, list[np.ndarray]] = {n: [v] for n, v in background.items()}
        for i in members:
            canary = np.zeros(dim)
            canary[i] = clip
            updates[f"canary-{i}"] = [canary]
        if not updates:  # nothing included and no background: the release is pure noise
            total += rng.normal(0.0, z * clip, dim)
            continue
        result = build(clip, z).aggregate(updates, None)
        survivors = result.report.get("included") or list(updates)
        total += np.asarray(result.mean[0], dtype=np.float64).reshape(-1) * len(survivors)
    scores = total[:canaries] / clip
    order = np.argsort(-scores, kind="stable")
    k = guesses // 2
    correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
    bound = epsilon_lower_bound(canaries, guesses, correct, delta, confidence)
    name = (
        "secure_fl CentralGaussian around the plain sum"
        if mechanism is None
        else getattr(mechanism, "__qualname__", type(mechanism).__name__)
    )
    return EmpiricalAudit(
        lower_bound=bound,
        accounted_epsilon=accounted_epsilon,
        delta=float(delta),
        confidence=float(confidence),
        canaries=canaries,
        guesses=guesses,
        correct=correct,
        clip=float(clip),
        noise_multipliers=zs,
        mechanism=name,
        seeded=seed is not None,
    )


def empirical_audit_run(
    run_dir: str | Path,
    *,
    canaries: int = DEFAULT_CANARIES,
    guesses: int = DEFAULT_GUESSES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | None = None,
) -> EmpiricalAudit:
    """Empirically audit the site-level central DP-FedAvg mechanism of the run in ``run_dir``:
    the clip, the per-round noise multiplier (the least any site's record of that round names) and
    the number of rounds come from the run's privacy ledger, the accounted epsilon is the largest
    any site has spent there (at config.json's delta, with its accountant); then
    :func:`audit_gaussian_sum` (the mechanism implementation, not the training pipeline).

    Errors: ConfigError when ``run_dir`` has no readable config.json or ledger, when the run is not
    ``privacy.level = "site"`` with ``privacy.trust = "central"`` (naming both), or holds no
    ledger records; LedgerIntegrityError for a broken ledger.
    """
    from secure_fl.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

    run = Path(run_dir)
    try:
        config = json.loads((run / "config.json").read_text())
        privacy = dict(config["privacy"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{run}: no readable config.json with a privacy section ({exc})") from exc
    level, trust = privacy.get("level"), privacy.get("trust")
    if level != "site" or trust != "central":
        raise ConfigError(
            "the empirical audit covers privacy.level='site' with privacy.trust='central' "
            f"(DP-FedAvg, central noise); this run has privacy.level={level!r}, "
            f"privacy.trust={trust!r}"
        )
    delta = float(privacy.get("delta", 1e-5))
    accountant = str(privacy.get("accountant", "rdp"))
    if not (run / LEDGER_FILENAME).is_file():
        raise ConfigError(f"{run / LEDGER_FILENAME}: no privacy ledger")
    with PrivacyLedger(run / LEDGER_FILENAME, readonly=True) as ledger:
        records = ledger.entries()
        sites = ledger.sites()
        spent = max((ledger.spent(s, delta, accountant) for s in sites), default=0.0)
    if not records:
        raise ConfigError(f"{run / LEDGER_FILENAME}: the ledger holds no records")
    per_round: dict[int, float] = {}
    clip = 0.0
    for r in records:
        z = r.effective_noise_multiplier
        per_round[r.entry.round] = min(z, per_round.get(r.entry.round, z))
        clip = max(clip, r.entry.clip)
    zs = [per_round[k] for k in sorted(per_round)]
    return audit_gaussian_sum(
        clip=clip,
        noise_multipliers=zs,
        delta=delta,
        accounted_epsilon=spent,
        canaries=canaries,
        guesses=guesses,
        confidence=confidence,
        background_sites=len(sites),
        seed=seed,
    )


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
