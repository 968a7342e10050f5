"""Re-derivation of the mechanism parameters from config.json and the datalist (never from the
ledger): sampling rate, steps and least noise per site (:class:`Derived`), the most noise a
record can be credited with, and the event selection that applies both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.privacy.accounting import PrivacyEvent, calibrate_noise
from secure_fl.privacy.audit.model import ERROR, WARNING, Finding, _int_or_none, _num, _where
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.ledger import LedgerRecord, select_events


@dataclass(frozen=True)
class Derived:
    """What the configuration and the datalist say one site's records must carry, per round:
    sampling rate ``q``, ``steps`` (None: not verifiable, e.g. site participation drawn at random)
    and the least noise multiplier ``sigma`` (None: unknown). ``basis`` says where it comes from."""

    q: float
    steps: int | None
    sigma: float | None
    basis: str


NOISE_REL_TOL = 1e-4
"""Relative slack above a justified noise multiplier that is still credited as recorded (the
floating-point slack of the runner's calibrations, e.g. distributed noise sizing overshoots by
about 1e-6); above it a record is ``NOISE_ABOVE_DERIVED`` and accounted at the justified value."""


def _select(
    records: Sequence[LedgerRecord],
    site: str,
    strategy: str | None,
    upto: int | None,
    derived: Mapping[str, Derived] | None = None,
    caps: Mapping[int, float] | None = None,
) -> list[PrivacyEvent]:
    """The site's events as the ledger stood after record ``upto``, with the sampling rate and
    steps raised to the re-derived ones (``derived``) where the ledger shows less, and the noise
    multiplier lowered to the justified one (``caps``: record id -> the most noise the audit can
    re-derive, :func:`_justify_noise`) where the ledger claims more than ``NOISE_REL_TOL`` above
    it."""
    d = (derived or {}).get(site)

    def adjust(r: LedgerRecord, event: PrivacyEvent) -> PrivacyEvent:
        if d is not None:
            event = replace(
                event,
                sample_rate=max(event.sample_rate, d.q),
                steps=max(event.steps, d.steps or 0),
            )
        cap = (caps or {}).get(r.id)
        claimed = r.entry.noise_multiplier
        if cap is not None and claimed > cap * (1 + NOISE_REL_TOL):
            # scale the accounted multiplier (survivor effects included) down to the justified one
            event = replace(event, noise_multiplier=event.noise_multiplier * cap / claimed)
        return event

    return select_events(records, site, strategy=strategy, upto=upto, adjust=adjust)


def _derive(
    config: Mapping[str, Any],
    pcfg: PrivacyConfig,
    ledger_sites: Sequence[str],
    datalist: str | Path | None,
    findings: list[Finding],
) -> tuple[dict[str, Derived], dict[int, set[str]] | None]:
    """Per site, what the configuration and the datalist split say its records must carry (see
    :class:`Derived`), and, at sample level, which sites train in which round (None: unknown).

    Mirrors the runner (:class:`secure_fl.training.privacy_run.PrivacyRound`), computed here
    independently from config.json and the datalist, never from the ledger."""
    rounds = _int_or_none(config.get("rounds"))
    if rounds is None or rounds < 1:
        findings.append(
            Finding("CONFIG_INVALID", ERROR, "config.json has no valid 'rounds': nothing derived")
        )
        return {}, None

    def least_noise(q: float, steps: int) -> float | None:
        if pcfg.target_epsilon is None:
            return None  # a configured multiplier is checked by _check_config
        options: dict[str, Any] = {}
        if pcfg.mechanism == "skellam":
            options["integer_orders"] = True
        try:
            return calibrate_noise(
                pcfg.target_epsilon, q, steps, pcfg.delta, accountant=pcfg.accountant, **options
            )
        except (ConfigError, TypeError) as exc:
            findings.append(
                Finding("NOISE_UNVERIFIABLE", WARNING, f"could not re-derive the noise: {exc}")
            )
            return None

    if pcfg.level == "site":
        every_round = pcfg.site_sample_rate >= 1.0
        sigma = least_noise(1.0, rounds)
        basis = "site level: q = 1 (no amplification by site sampling), " + (
            "1 step per round" if every_round else "0 or 1 step per round (random participation)"
        )
        return {
            s: Derived(1.0, 1 if every_round else None, sigma, basis) for s in ledger_sites
        }, None

    train_raw, data_raw = config.get("train"), config.get("data")
    train: Mapping[str, Any] = train_raw if isinstance(train_raw, dict) else {}
    data: Mapping[str, Any] = data_raw if isinstance(data_raw, dict) else {}
    batch = _int_or_none(train.get("batch_size"))
    epochs = _int_or_none(train.get("local_epochs"))
    seed = _int_or_none(config.get("seed"))
    val_fraction = _num(data.get("val_fraction"))
    strategies = config.get("strategies")
    strategy = strategies[0] if isinstance(strategies, list) and strategies else "fedavg"
    path = Path(datalist) if datalist is not None else _datalist_path(data)
    why = None
    if batch is None or epochs is None or batch < 1 or epochs < 1:
        why = "config.json lacks a valid train.batch_size or train.local_epochs"
    elif seed is None or val_fraction is None or path is None:
        why = "config.json lacks seed, data.val_fraction or data.datalist/synthetic_dir"
    else:
        from secure_fl.data.datalist import load_datalist, split_by_site

        try:
            # Held-out institutions never train: they are not part of any mechanism.
            holdout = set(data.get("holdout_sites") or ())
            splits = split_by_site(
                [c for c in load_datalist(path, must_exist=False) if c.site not in holdout],
                val_fraction=float(val_fraction or 0.0),
                seed=int(seed or 0),
            )
        except (ConfigError, OSError, ValueError) as exc:
            why = f"the datalist {path} is unavailable or invalid ({exc})"
    if why is not None:
        findings.append(
            Finding(
                "DATALIST_UNAVAILABLE",
                WARNING,
                f"{why}: the sampling rate and steps could not be re-derived; the ledger's own "
                "values were used (pass the datalist with --datalist)",
            )
        )
        return {}, None
    if batch is None or epochs is None:  # pragma: no cover - excluded above (narrows for mypy)
        return {}, None
    n_train = {site: len(tr) for site, (tr, _) in splits.items()}
    names = sorted(n_train)

    def plan(n: int, basis: str) -> Derived:
        q = min(1.0, batch / n)
        steps = epochs * math.ceil(1.0 / q)
        return Derived(q, steps, least_noise(q, rounds * steps), basis)

    if pcfg.level == "sample" and pcfg.trust == "distributed":
        # federated DP-SGD (secure_fl.training.fed_dpsgd): one global step per round, each
        # patient of the pooled cohort Poisson-sampled at q = batch_size / pooled training cases
        total = sum(n_train.values())
        q = min(1.0, batch / total) if total else 1.0
        basis = f"federated DP-SGD: batch {batch} / {total} pooled training cases, 1 step/round"
        fed = Derived(q, 1, least_noise(q, rounds), basis)
        derived = {s: fed for s in names}
    elif strategy == "centralized":
        total = sum(n_train.values())
        pooled = plan(total, f"pooled trainer: batch {batch} / {total} training cases")
        derived = {s: pooled for s in names}
    else:
        derived = {s: plan(n, f"batch {batch} / {n} training cases") for s, n in n_train.items()}
    schedule: dict[int, set[str]] = {}
    for r in range(rounds):
        if strategy == "swt":
            schedule[r] = {names[min(len(names) - 1, r * len(names) // rounds)]}
        else:
            schedule[r] = set(names)
    for site in ledger_sites:
        if site not in derived:
            findings.append(
                Finding(
                    "SITE_UNKNOWN",
                    WARNING,
                    f"site {site!r} has ledger records but no cases in the datalist {path}",
                    site=site,
                )
            )
    return derived, schedule


def _datalist_path(data: Mapping[str, Any]) -> Path | None:
    name = data.get("datalist")
    if isinstance(name, str) and name:
        return Path(name)
    folder = data.get("synthetic_dir")
    if isinstance(folder, str) and folder:
        return Path(folder) / "datalist.json"
    return None


def _check_derived(
    records: Sequence[LedgerRecord], derived: Mapping[str, Derived], findings: list[Finding]
) -> None:
    """Every record against the re-derived sampling rate, steps and least noise."""
    for r in records:
        e, d = r.entry, derived.get(r.entry.site)
        if d is None:
            continue
        where = _where(e)
        if e.sample_rate < d.q * (1 - 1e-12):
            findings.append(
                Finding(
                    "SAMPLING_BELOW_DERIVED",
                    ERROR,
                    f"record {r.id} claims sampling rate {e.sample_rate:g}; the configuration and "
                    f"datalist give {d.q:g} ({d.basis}): accounted at {d.q:g}",
                    **where,
                )
            )
        if d.steps is not None and r.accounted_steps < d.steps:
            findings.append(
                Finding(
                    "STEPS_BELOW_DERIVED",
                    ERROR,
                    f"record {r.id} claims {r.accounted_steps} steps; the configuration and "
                    f"datalist give {d.steps} per round ({d.basis}): accounted at {d.steps}",
                    **where,
                )
            )
        ran = min(e.noise_multiplier, r.confirmed_noise_multiplier or math.inf)
        if d.sigma is not None and ran < d.sigma * (1 - 1e-9):
            findings.append(
                Finding(
                    "NOISE_BELOW_CONFIG",
                    ERROR,
                    f"record {r.id} ran noise multiplier {ran:.6g}, below the {d.sigma:.6g} the "
                    f"configuration asks for ({d.basis})",
                    **where,
                )
            )


def _justify_noise(
    records: Sequence[LedgerRecord],
    derived: Mapping[str, Derived],
    schedule: Mapping[int, set[str]] | None,
    pcfg: PrivacyConfig,
    config: Mapping[str, Any],
    findings: list[Finding],
) -> dict[int, float]:
    """The most noise multiplier each record can be credited with (record id -> multiplier).

    Whoever can write the run folder can rebuild the ledger claiming more noise than ran (a
    smaller epsilon); the audit never credits more than it can re-derive: the multiplier the
    configuration calibrates (``target_epsilon``, from config.json and the datalist) or fixes
    (``noise_multiplier``), raised only by a resume recalibration the audit re-derives itself
    (:func:`_resume_scale`). A record above that (beyond ``NOISE_REL_TOL``) is
    ``NOISE_ABOVE_DERIVED`` (error) and accounted at the justified value. Records of a site with
    nothing derived (no datalist: ``DATALIST_UNAVAILABLE``) are not capped."""
    caps: dict[int, float] = {}
    scales: dict[tuple[int | None, str], tuple[float | None, str]] = {}
    for r in sorted(records, key=lambda rec: rec.id):
        e = r.entry
        d = derived.get(e.site)
        if pcfg.target_epsilon is not None:
            base = d.sigma if d is not None else None
            basis = f"calibrated for target_epsilon={pcfg.target_epsilon:g}" + (
                f" ({d.basis})" if d is not None else ""
            )
        else:
            base, basis = pcfg.noise_multiplier, "configured noise_multiplier"
        if base is None:
            continue
        cap, how = base, basis
        if "resume_scale" in e.params or "resume_from_round" in e.params:
            start = _int_or_none(e.params.get("resume_from_round"))
            group = str(e.params.get("trainer", "")) if e.level == "sample" else ""
            if (start, group) not in scales:
                scales[(start, group)] = _resume_scale(
                    records, start, group, derived, schedule, pcfg, config, caps
                )
            scale, why = scales[(start, group)]
            if scale is not None:
                cap = base * scale
                how = f"{basis}, x{scale:.6g} re-derived for the resume at round {(start or 0) + 1}"
            else:
                how = f"{basis}; the recorded resume recalibration is not verifiable: {why}"
        caps[r.id] = cap
        if e.noise_multiplier > cap * (1 + NOISE_REL_TOL):
            findings.append(
                Finding(
                    "NOISE_ABOVE_DERIVED",
                    ERROR,
                    f"record {r.id} claims noise multiplier {e.noise_multiplier:.6g}, above the "
                    f"{cap:.6g} the run can justify ({how}): accounted at {cap:.6g}",
                    **_where(e),
                )
            )
    return caps


def _resume_scale(
    records: Sequence[LedgerRecord],
    start: int | None,
    group: str,
    derived: Mapping[str, Derived],
    schedule: Mapping[int, set[str]] | None,
    pcfg: PrivacyConfig,
    config: Mapping[str, Any],
    caps: Mapping[int, float],
) -> tuple[float | None, str]:
    """Re-derive the factor by which a resume at round ``start`` (0-based) raised ``group``'s
    noise (a trainer at sample level, ``""`` at site level): what
    :meth:`~secure_fl.training.privacy_run.PrivacyRound.recalibrate_for_resume` computed, with
    the same :func:`~secure_fl.privacy.budget.resume_noise_scale`, from the records written
    before the resumed session's first record (accounted as the audit accounts them, ``caps``)
    and the planned rounds ``start..rounds-1`` re-derived from the configuration. Returns
    ``(scale, "")`` or ``(None, why)`` when the recorded resume cannot be justified."""
    from secure_fl.privacy.budget import resume_noise_scale

    rounds = _int_or_none(config.get("rounds"))
    if pcfg.target_epsilon is None:
        return None, "no target_epsilon: a fixed noise multiplier is never recalibrated"
    if rounds is None or start is None or not 0 <= start < rounds:
        return None, f"resume_from_round={start!r} is not a round of the {rounds} planned"
    session = [r for r in records if _int_or_none(r.entry.params.get("resume_from_round")) == start]
    boundary = min(r.id for r in session)
    first = next(r for r in session if r.id == boundary)
    if first.entry.round != start:
        return None, (
            f"the resumed session's first record ({boundary}) is of round "
            f"{first.entry.round + 1}, not of round {start + 1} it claims to resume at"
        )
    history_records = [r for r in records if r.id < boundary]
    if any(r.entry.round > start for r in history_records):
        return None, f"records before the resume at round {start + 1} are of later rounds"
    if pcfg.level == "sample":
        members = sorted(derived) if group == "pooled" else [group]
    else:
        members = sorted(derived)
    if not members or any(s not in derived or derived[s].sigma is None for s in members):
        return None, f"nothing is derived for the noise group {group or 'all sites'!r}"
    future: dict[str, list[PrivacyEvent]] = {}
    for site in members:
        d = derived[site]
        sigma = d.sigma or 0.0
        events = []
        for rnd in range(start, rounds):
            trains = (
                pcfg.level == "site"
                or schedule is None
                or group == "pooled"
                or group in schedule.get(rnd, set())
            )
            if trains:
                # site level with random participation: every site charged (an upper bound)
                steps = d.steps if d.steps is not None else 1
                events.append(
                    PrivacyEvent(sigma, d.q, steps, integer_orders=pcfg.mechanism == "skellam")
                )
        future[site] = events
    history = {
        s: _select(history_records, s, None, None, derived, caps)
        for s in sorted({r.entry.site for r in history_records} | set(members))
    }
    try:
        scale = resume_noise_scale(
            history, future, pcfg.target_epsilon, pcfg.delta, pcfg.accountant
        )
    except ConfigError as exc:
        return None, str(exc)
    if scale is None:
        return None, "no factor fits the target (the runner would have refused the round)"
    return scale, ""
