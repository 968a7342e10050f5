"""Record and configuration checks of the audit: the two accountants agree, records match the
configuration, confirmations, noise sources and rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from secure_fl.privacy.accounting import PRV_EPS_ERROR
from secure_fl.privacy.audit.derive import Derived, _select
from secure_fl.privacy.audit.epsilon import _EpsilonCache
from secure_fl.privacy.audit.model import ERROR, WARNING, Finding, _int_or_none, _num, _where
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.ledger import LedgerRecord


def _check_accountants(
    epsilon: dict[str, dict[str, float]], tolerance: float, findings: list[Finding]
) -> None:
    """RDP is an upper bound on the tight epsilon, PRV/PLD's upper estimates are within
    ``PRV_EPS_ERROR`` above it: RDP below them by more than twice that is impossible if both
    computations are right."""
    for site, by_acc in epsilon.items():
        rdp = by_acc.get("rdp")
        for tight in ("prv", "pld"):
            value = by_acc.get(tight)
            if rdp is None or value is None:
                continue
            if not (math.isfinite(rdp) and math.isfinite(value)):
                continue  # an infinite upper bound contradicts nothing
            if rdp < value - 2 * PRV_EPS_ERROR - tolerance:
                findings.append(
                    Finding(
                        "ACCOUNTANT_DISAGREEMENT",
                        ERROR,
                        f"rdp gives ε={rdp:.6g}, below {tight}'s ε={value:.6g} by more than "
                        f"the known gap 2 x {PRV_EPS_ERROR}: one accountant is wrong",
                        site=site,
                    )
                )


def _check_config(
    pcfg: PrivacyConfig,
    records: Sequence[LedgerRecord],
    epsilon: dict[str, dict[str, float]],
    eps: _EpsilonCache,
    delta: float,
    tolerance: float,
    derived: Mapping[str, Derived],
    caps: Mapping[int, float],
    findings: list[Finding],
) -> None:
    for r in records:
        e = r.entry
        where = _where(e)
        if pcfg.enabled and e.level != pcfg.level:
            findings.append(
                Finding(
                    "CONFIG_MISMATCH",
                    ERROR,
                    f"record {r.id} has level {e.level!r}, the configuration {pcfg.level!r}",
                    **where,
                )
            )
        if pcfg.enabled and e.mechanism != pcfg.mechanism:
            findings.append(
                Finding(
                    "CONFIG_MISMATCH",
                    ERROR,
                    f"record {r.id} ran mechanism {e.mechanism!r}, the configuration "
                    f"{pcfg.mechanism!r}",
                    **where,
                )
            )
        if pcfg.enabled and not math.isclose(e.clip, pcfg.clip, rel_tol=1e-9):
            findings.append(
                Finding(
                    "CONFIG_MISMATCH",
                    WARNING,
                    f"record {r.id} clipped at {e.clip:g}, the configuration at {pcfg.clip:g}",
                    **where,
                )
            )
        if not math.isclose(e.delta, pcfg.delta, rel_tol=1e-9):
            findings.append(
                Finding(
                    "CONFIG_MISMATCH",
                    WARNING,
                    f"record {r.id} has delta {e.delta:g}, the configuration {pcfg.delta:g}",
                    **where,
                )
            )
        ran = min(e.noise_multiplier, r.confirmed_noise_multiplier or math.inf)
        if pcfg.noise_multiplier is not None and ran < pcfg.noise_multiplier * (1 - 1e-12):
            findings.append(
                Finding(
                    "NOISE_BELOW_CONFIG",
                    ERROR,
                    f"record {r.id} ran noise multiplier {ran:g}, below the configured "
                    f"{pcfg.noise_multiplier:g}",
                    **where,
                )
            )
        if pcfg.target_epsilon is not None:
            calibrated = _num(e.params.get("calibrated_noise_multiplier"))
            if calibrated is None:
                findings.append(
                    Finding(
                        "NOISE_UNVERIFIABLE",
                        WARNING,
                        f"record {r.id} has no params['calibrated_noise_multiplier'] to check "
                        f"against target_epsilon={pcfg.target_epsilon:g}",
                        **where,
                    )
                )
            elif ran < calibrated * (1 - 1e-12):
                findings.append(
                    Finding(
                        "NOISE_BELOW_CONFIG",
                        ERROR,
                        f"record {r.id} ran noise multiplier {ran:g}, below the "
                        f"{calibrated:g} calibrated for target_epsilon={pcfg.target_epsilon:g}",
                        **where,
                    )
                )
    per_site = {
        site: eps(_select(records, site, None, None, derived, caps), delta, pcfg.accountant)
        for site in epsilon
    }
    if pcfg.target_epsilon is not None:
        for site, value in per_site.items():
            if value > pcfg.target_epsilon + tolerance:
                findings.append(
                    Finding(
                        "EPSILON_ABOVE_TARGET",
                        ERROR,
                        f"site {site!r} spent ε={value:.6g} ({pcfg.accountant}), above "
                        f"target_epsilon={pcfg.target_epsilon:g}",
                        site=site,
                    )
                )
    if pcfg.site_budget is not None:
        for site, value in per_site.items():
            if value > pcfg.site_budget + tolerance:
                findings.append(
                    Finding(
                        "BUDGET_EXCEEDED",
                        ERROR,
                        f"site {site!r} spent ε={value:.6g} ({pcfg.accountant}), above its "
                        f"budget {pcfg.site_budget:g}",
                        site=site,
                    )
                )
    fed = max(per_site.values(), default=0.0)
    if pcfg.federation_budget is not None and fed > pcfg.federation_budget + tolerance:
        findings.append(
            Finding(
                "BUDGET_EXCEEDED",
                ERROR,
                f"federation spent ε={fed:.6g} (max over sites, {pcfg.accountant}), above its "
                f"budget {pcfg.federation_budget:g}",
            )
        )


def _check_records(records: Sequence[LedgerRecord], findings: list[Finding]) -> None:
    for r in records:
        e = r.entry
        where = _where(e)
        if not r.confirmed:
            findings.append(
                Finding(
                    "UNCONFIRMED_INTENT",
                    WARNING,
                    f"record {r.id} was never confirmed (crash or abort); counted as spent",
                    **where,
                )
            )
        if r.confirmed_steps is not None and r.confirmed_steps > e.steps:
            findings.append(
                Finding(
                    "STEPS_ABOVE_INTENT",
                    WARNING,
                    f"record {r.id} ran {r.confirmed_steps} steps, {e.steps} were intended "
                    "(and checked against the budget)",
                    **where,
                )
            )
        threshold = _num(e.params.get("threshold"))
        survivors = r.accounted_survivors
        if threshold is not None and survivors is not None and survivors < threshold:
            findings.append(
                Finding(
                    "SURVIVORS_BELOW_THRESHOLD",
                    ERROR,
                    f"record {r.id}: {survivors} sites survived, the noise was sized for at least "
                    f"{threshold:g}; effective noise multiplier {r.effective_noise_multiplier:.4g} "
                    f"instead of {e.noise_multiplier:.4g} (accounted as such)",
                    **where,
                )
            )


def _check_noise_source(records: Sequence[LedgerRecord], findings: list[Finding]) -> None:
    """Seeded noise is predictable by whoever knows the seed; old records do not say."""
    seeded = [r for r in records if r.entry.params.get("noise_source") == "seeded"]
    unknown = [r for r in records if r.entry.params.get("noise_source") not in ("csprng", "seeded")]
    if seeded:
        first = seeded[0].entry
        findings.append(
            Finding(
                "NOISE_PREDICTABLE",
                ERROR,
                f"{len(seeded)} record(s) drew their DP noise from a seeded generator "
                "(privacy.reproducible_noise = true): anyone who knows the seed can regenerate "
                "and subtract the noise, so the reported epsilon does not hold against them",
                site=first.site,
                round=first.round,
                strategy=first.strategy or None,
            )
        )
    if unknown:
        first = unknown[0].entry
        findings.append(
            Finding(
                "NOISE_SOURCE_UNKNOWN",
                WARNING,
                f"{len(unknown)} record(s) do not say where their noise came from "
                "(params['noise_source'] missing: written before noise sources were recorded, "
                "when DP noise derived from the run seed): the noise may be predictable",
                site=first.site,
                round=first.round,
                strategy=first.strategy or None,
            )
        )


def _check_row_survivors(
    row: Mapping[str, Any],
    rnd: int,
    strategy: str,
    charged: set[str] | None,
    findings: list[Finding],
) -> None:
    """A metrics row's ``survivors`` (a list of site names; a count is not checked) must all be
    charged by the ledger in that round: a survivor whose update entered the release without a
    ledger record spent privacy nobody accounted (UNCHARGED_SURVIVOR, error). Rows of rounds
    the ledger lacks are MISSING_ROUND's."""
    names = row.get("survivors")
    if charged is None or not isinstance(names, list):
        return
    for name in sorted({str(n) for n in names} - charged):
        findings.append(
            Finding(
                "UNCHARGED_SURVIVOR",
                ERROR,
                f"metrics.jsonl names {name!r} a survivor of round {rnd + 1}, but the ledger did "
                "not charge it in that round",
                site=name,
                round=rnd,
                strategy=strategy or None,
            )
        )


def _check_rounds(
    records: Sequence[LedgerRecord],
    rows: Sequence[dict[str, Any]],
    config: dict[str, Any],
    pcfg: PrivacyConfig | None,
    dp_enabled: bool,
    strategies_named: bool,
    schedule: Mapping[int, set[str]] | None,
    findings: list[Finding],
) -> None:
    if not dp_enabled:
        return
    by_strategy: dict[str, set[int]] = {}
    sites_by_round: dict[tuple[str, int], set[str]] = {}
    all_sites: set[str] = set()
    for r in records:
        s = r.entry.strategy if strategies_named else ""
        by_strategy.setdefault(s, set()).add(r.entry.round)
        sites_by_round.setdefault((s, r.entry.round), set()).add(r.entry.site)
        all_sites.add(r.entry.site)
    reported_missing: set[tuple[str, int]] = set()
    for row in rows:
        rnd = _int_or_none(row.get("round"))
        if rnd is None:
            continue
        s = str(row.get("strategy") or "") if strategies_named else ""
        _check_row_survivors(row, rnd, s, sites_by_round.get((s, rnd)), findings)
        if rnd not in by_strategy.get(s, set()) and (s, rnd) not in reported_missing:
            reported_missing.add((s, rnd))
            findings.append(
                Finding(
                    "MISSING_ROUND",
                    ERROR,
                    f"round {rnd + 1} appears in metrics.jsonl but the ledger has no record of it",
                    round=rnd,
                    strategy=str(row.get("strategy") or "") or None,
                )
            )
    for s, rounds in sorted(by_strategy.items()):
        for gap in sorted(set(range(max(rounds) + 1)) - rounds):
            if (s, gap) in reported_missing:
                continue
            findings.append(
                Finding(
                    "MISSING_ROUND",
                    ERROR,
                    f"the ledger has no record of round {gap + 1} (rounds must be contiguous from "
                    f"1; recorded: {[r + 1 for r in sorted(rounds)[:5]]}...{max(rounds) + 1})",
                    round=gap,
                    strategy=s or None,
                )
            )
    planned_rounds = _int_or_none(config.get("rounds"))
    if planned_rounds is not None:
        for s, rounds in sorted(by_strategy.items()):
            extra = sorted(r for r in rounds if r >= planned_rounds)
            if extra:
                findings.append(
                    Finding(
                        "ROUND_OUT_OF_RANGE",
                        WARNING,
                        f"the ledger records round(s) {[r + 1 for r in extra]} but config.json plans "
                        f"{planned_rounds} rounds",
                        strategy=s or None,
                    )
                )
    if pcfg is not None and pcfg.level == "site":
        for (s, rnd), present in sorted(sites_by_round.items()):
            for site in sorted(all_sites - present):
                findings.append(
                    Finding(
                        "MISSING_ROUND",
                        ERROR,
                        f"site {site!r} has no record in round {rnd + 1}: site-level DP accounts "
                        "every site in every round (Poisson participation)",
                        site=site,
                        round=rnd,
                        strategy=s or None,
                    )
                )
    elif schedule is not None:  # sample level: the sites that train in the round (datalist)
        for (s, rnd), present in sorted(sites_by_round.items()):
            for site in sorted(schedule.get(rnd, set()) - present):
                findings.append(
                    Finding(
                        "MISSING_ROUND",
                        ERROR,
                        f"site {site!r} trains in round {rnd + 1} (config.json and the datalist) but "
                        "the ledger has no record of it there",
                        site=site,
                        round=rnd,
                        strategy=s or None,
                    )
                )
