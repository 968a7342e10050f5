"""Privacy budgets per site and per federation, enforced before a round runs.

Definitions (epsilon at the run's delta, with the chosen accountant, from the ledger):

* **site epsilon** - the composition of every record of that site in the ledger (all strategies
  and rounds; unconfirmed intents included). At sample level it bounds what the released models
  reveal about any one patient of that site; at site level, about that institution's participation.
* **federation epsilon** - the maximum of the site epsilons. At sample level each patient's
  records sit at one site and sites train on disjoint data, so by parallel composition the
  guarantee to any patient of the federation is the worst site's. At site level DP-FedAvg gives
  every institution the same guarantee (every site is recorded every round with the same
  mechanism), so the maximum is that common value. Caveat: a patient whose records are held by
  several sites gets the composition of those sites' events, which this definition does not cover
  (``composition="sequential"`` in :func:`federation_epsilon` composes all sites' events and is an
  upper bound for that case at sample level; it is needlessly loose at site level).

A run's ``target_epsilon`` is a budget too (the runner passes it to :func:`check_budget` with the
site budget). Resuming an interrupted run re-runs the interrupted round although its intents are
already counted; :func:`resume_noise_scale` gives the factor by which the remaining rounds' noise
must grow so that the target still holds (or None: the next round is refused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from secure_fl.errors import BudgetExceededError, ConfigError
from secure_fl.privacy.accounting import (
    PrivacyEvent,
    _check_accountant,
    _check_delta,
    _check_real,
    bisect_geometric,
    epsilon_of_events,
)
from secure_fl.privacy.ledger import LedgerEntry, PrivacyLedger, entry_event


@dataclass(frozen=True)
class BudgetStatus:
    """Epsilon per site before and after the planned round, and the federation's (the maximum)."""

    delta: float
    accountant: str
    spent: dict[str, float]
    projected: dict[str, float]
    federation_spent: float
    federation_projected: float


def planned_event(entry: LedgerEntry) -> PrivacyEvent:
    """The accountant event of a planned entry: exactly what the ledger will count for its
    intent (:func:`secure_fl.privacy.ledger.entry_event`: honest survivors, integer orders)."""
    return entry_event(entry)


def federation_epsilon(
    ledger: PrivacyLedger,
    delta: float,
    accountant: str = "rdp",
    *,
    composition: str = "parallel",
) -> float:
    """The federation's epsilon: the maximum over sites (``"parallel"``, the default; see the
    module docstring) or the composition of every site's events (``"sequential"``).
    """
    if composition == "parallel":
        return max((ledger.spent(s, delta, accountant) for s in ledger.sites()), default=0.0)
    if composition == "sequential":
        events = [e for s in ledger.sites() for e in ledger.events_for(s)]
        return epsilon_of_events(events, delta, accountant)
    raise ConfigError(f"composition must be 'parallel' or 'sequential', got {composition!r}")


def check_budget(
    ledger: PrivacyLedger,
    planned: Sequence[LedgerEntry],
    *,
    site_budget: float | None,
    federation_budget: float | None,
    delta: float,
    accountant: str = "rdp",
) -> BudgetStatus:
    """Refuse a round whose planned entries would take a site or the federation over budget.

    Call before :meth:`PrivacyLedger.record_intent`. Verifies the ledger first (a tampered ledger
    raises LedgerIntegrityError: no round runs on it), then computes every site's epsilon with and
    without ``planned`` (unconfirmed intents count as spent). Returns the projection when within
    budget.

    Raises BudgetExceededError before anything runs, naming each site over budget with its spent
    and projected epsilon, the budget and the remaining epsilon (e.g. ``site 'a': spent
    ε=0.912, this round would bring it to 1.104, site budget 1.000, remaining 0.088``), and
    likewise for the federation (the maximum over sites). ConfigError for invalid arguments.
    """
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    for name, budget in (("site_budget", site_budget), ("federation_budget", federation_budget)):
        if budget is not None:
            _check_real(name, budget, low=0.0)
    planned = list(planned)
    for p in planned:
        if not isinstance(p, LedgerEntry):
            raise ConfigError(f"planned must hold LedgerEntry values, got {type(p).__name__}")
    ledger.verify()

    by_site: dict[str, list[PrivacyEvent]] = {}
    for p in planned:
        by_site.setdefault(p.site, []).append(planned_event(p))
    sites = sorted(set(ledger.sites()) | set(by_site))
    spent: dict[str, float] = {}
    projected: dict[str, float] = {}
    for site in sites:
        history = ledger.events_for(site)
        spent[site] = epsilon_of_events(history, delta, accountant)
        extra = by_site.get(site, [])
        projected[site] = (
            epsilon_of_events(history + extra, delta, accountant) if extra else spent[site]
        )
    fed_spent = max(spent.values(), default=0.0)
    fed_projected = max(projected.values(), default=0.0)

    problems: list[str] = []
    if site_budget is not None:
        for site in sites:
            if site in by_site and projected[site] > site_budget:
                problems.append(
                    f"site {site!r}: spent ε={_fmt(spent[site])}, this round would bring it to "
                    f"{_fmt(projected[site])}, site budget {_fmt(site_budget)}, remaining "
                    f"{_fmt(max(site_budget - spent[site], 0.0))}"
                )
    if federation_budget is not None and planned and fed_projected > federation_budget:
        worst = max(projected, key=lambda s: projected[s])
        problems.append(
            f"federation (max over sites): spent ε={_fmt(fed_spent)}, this round would bring it "
            f"to {_fmt(fed_projected)} (site {worst!r}), federation budget "
            f"{_fmt(federation_budget)}, remaining {_fmt(max(federation_budget - fed_spent, 0.0))}"
        )
    if problems:
        raise BudgetExceededError(
            f"round refused before it runs (δ={delta:g}, accountant {accountant}): "
            + "; ".join(problems)
        )
    return BudgetStatus(
        delta=delta,
        accountant=accountant,
        spent=spent,
        projected=projected,
        federation_spent=fed_spent,
        federation_projected=fed_projected,
    )


_SCALE_MAX = 1e4


def resume_noise_scale(
    history: Mapping[str, Sequence[PrivacyEvent]],
    future: Mapping[str, Sequence[PrivacyEvent]],
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    *,
    tolerance: float = 1e-3,
) -> float | None:
    """The smallest factor ``s >= 1`` by which the noise multipliers of the ``future`` events
    must grow so that every site's epsilon, ``history`` (what the ledger already holds, unconfirmed
    intents included) composed with the scaled ``future``, stays at or below ``target_epsilon``.

    Guarantee: when a factor is returned, recomputing each site's epsilon with it gives a value
    ``<= target_epsilon`` (checked before returning); 1.0 means the planned noise already fits (an
    uninterrupted resume keeps its noise, so it produces the same models). ``None`` when no factor
    up to 1e4 fits (the history alone is at or above the target): the caller must refuse the round
    (the budget check does). ``tolerance`` bounds how far above the smallest factor the bisection
    stops (absolute epsilon below the target). Raises ConfigError for invalid arguments.
    """
    target = _check_real("target_epsilon", target_epsilon, low=0.0)
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    sites = sorted(set(future))

    def worst(scale: float) -> float:
        values = [
            epsilon_of_events(
                list(history.get(site, []))
                + [replace(e, noise_multiplier=e.noise_multiplier * scale) for e in future[site]],
                delta,
                accountant,
            )
            for site in sites
        ]
        return max(values, default=0.0)

    if worst(1.0) <= target:
        return 1.0
    if worst(_SCALE_MAX) > target:
        return None
    lo, hi = 1.0, 2.0
    while worst(hi) > target:
        lo, hi = hi, min(hi * 2.0, _SCALE_MAX)
    hi = bisect_geometric(worst, lo, hi, target, tolerance)
    if not worst(hi) <= target:  # pragma: no cover - a bisection invariant
        raise ConfigError(f"recalibration failed: scale {hi:g} exceeds target {target:g}")
    return hi


def remaining_budget(spent: Mapping[str, float], budget: float | None) -> dict[str, float]:
    """``budget - spent`` per site (``inf`` without a budget, never below 0)."""
    if budget is None:
        return {s: math.inf for s in spent}
    return {s: max(budget - e, 0.0) for s, e in spent.items()}


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"
