"""Audit of a run's privacy: ``secure-fl audit RUN_DIR``.

Inputs in the run folder: ``privacy_ledger.sqlite`` (+ its ``.head`` anchor), ``config.json``
(``"privacy"``: :meth:`PrivacyConfig.to_dict`, ``"rounds"``) and ``metrics.jsonl`` (rows with DP
carry ``"privacy": {"epsilon": {site: eps}, "delta": d, "accountant": name}``, optionally
``"ledger_head"`` (or ``"ledger"``): ``{"count", "hash"}`` - the ledger head after the round - and ``"scope"``: ``"ledger"``
(default: the site's whole spend so far, all strategies) or ``"strategy"``).

What the audit checks (each failure is a :class:`Finding`; exit status 1 on any):

* the hash chain, the head anchor and every anchor copied into metrics.jsonl (``CHAIN_BROKEN``,
  ``ANCHOR_MISMATCH``);
* every site's epsilon recomputed from the ledger with two independent accountants (``rdp``,
  implemented in :mod:`secure_fl.privacy.accounting`, and Opacus ``prv``); they must agree within
  the known gap, RDP being an upper bound (``ACCOUNTANT_DISAGREEMENT``);
* every reported epsilon against the recomputed one of the same accountant on the ledger as it
  stood after that round: reported below it (``EPSILON_UNDER_REPORTED``) or above it - spend the
  ledger does not hold, e.g. a truncated tail (``EPSILON_OVER_REPORTED``); DP rows without a
  report (``EPSILON_NOT_REPORTED``, warning);
* missing rounds: a metrics round without ledger records, ledger rounds not contiguous from 0, at
  site level a site missing from a round (``MISSING_ROUND``);
* unconfirmed intents (a crash; counted in full) and confirmations with more steps than intended
  (``UNCONFIRMED_INTENT``, ``STEPS_ABOVE_INTENT``, warnings);
* noise below the configured multiplier or below the calibrated one recorded in
  ``params["calibrated_noise_multiplier"]`` (``NOISE_BELOW_CONFIG``; ``NOISE_UNVERIFIABLE`` when a
  target-epsilon run did not record it). Both are Gaussian-equivalent multipliers: for distributed
  noise, the ledger's (effective) multiplier at the threshold must reach them, sampling above the configured site rate
  (``SAMPLING_ABOVE_CONFIG``), level/mechanism/clip/delta differing from the configuration
  (``CONFIG_MISMATCH``);
* survivors below ``params["threshold"]``, the number of sites the distributed noise was sized
  for (``SURVIVORS_BELOW_THRESHOLD``);
* recomputed epsilon above ``target_epsilon`` or a budget (``EPSILON_ABOVE_TARGET``,
  ``BUDGET_EXCEEDED``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.jsonl import read_jsonl
from secure_fl.privacy.accounting import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    PrivacyEvent,
    canonical_events,
    epsilon_of_events,
)
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.ledger import (
    LEDGER_FILENAME,
    LedgerEntry,
    LedgerHead,
    LedgerIntegrityError,
    LedgerRecord,
    PrivacyLedger,
    select_events,
)

ERROR = "error"
WARNING = "warning"

AUDIT_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""The two independent accountants every site's epsilon is recomputed with."""


@dataclass(frozen=True)
class Finding:
    """One problem the audit found. ``severity`` is ``"error"`` or ``"warning"``."""

    code: str
    severity: str
    message: str
    site: str | None = None
    round: int | None = None
    strategy: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CurvePoint:
    """Cumulative RDP epsilon of every site after one (strategy, round) of the ledger."""

    label: str
    strategy: str
    round: int
    epsilon: dict[str, float]


@dataclass(frozen=True)
class AuditResult:
    """The audit's findings and recomputed epsilons (per site and accountant, at ``delta``)."""

    run_dir: Path
    findings: list[Finding]
    epsilon: dict[str, dict[str, float]]
    federation_epsilon: dict[str, float]
    delta: float
    privacy: dict[str, Any] | None
    records: int
    curve: list[CurvePoint] = field(default_factory=list)
    reported: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no finding at all (errors or warnings)."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "ok": self.ok,
            "delta": self.delta,
            "privacy": self.privacy,
            "ledger_records": self.records,
            "epsilon": self.epsilon,
            "federation_epsilon": self.federation_epsilon,
            "findings": [f.to_dict() for f in self.findings],
            "epsilon_vs_rounds": [asdict(p) for p in self.curve],
            "reported": [
                {"label": label, "site": site, "epsilon": eps} for label, site, eps in self.reported
            ],
        }

    def write_report(self, run_dir: str | Path | None = None) -> dict[str, Path]:
        """Write ``audit.md``, ``audit.json`` and ``epsilon_vs_rounds.png`` into ``run_dir``
        (default: the audited folder); returns their paths."""
        out = Path(run_dir) if run_dir is not None else self.run_dir
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "markdown": out / "audit.md",
            "json": out / "audit.json",
            "png": out / "epsilon_vs_rounds.png",
        }
        paths["json"].write_text(json.dumps(_json_safe(self.to_dict()), indent=2) + "\n")
        paths["markdown"].write_text(self._markdown())
        self._plot(paths["png"])
        return paths

    def _markdown(self) -> str:
        status = "PASS - no findings" if self.ok else f"FAIL - {len(self.findings)} finding(s)"
        lines = [
            f"# Privacy audit of `{self.run_dir}`",
            "",
            f"**{status}**",
            "",
            f"- ledger records: {self.records}",
            f"- delta: {self.delta:g}",
        ]
        if self.privacy:
            cfg = ", ".join(f"{k}={v}" for k, v in self.privacy.items())
            lines.append(f"- configuration: {cfg}")
        last_reported: dict[str, float] = {}
        for _, site, eps in self.reported:
            last_reported[site] = eps
        accs = sorted({a for v in self.epsilon.values() for a in v})
        lines += ["", "## Epsilon per site (recomputed from the ledger)", ""]
        if self.epsilon:
            lines.append("| site | " + " | ".join(accs) + " | last reported |")
            lines.append("|---|" + "---|" * len(accs) + "---|")
            for site, by_acc in sorted(self.epsilon.items()):
                vals = " | ".join(_fmt(by_acc.get(a, math.nan)) for a in accs)
                rep = _fmt(last_reported[site]) if site in last_reported else "-"
                lines.append(f"| {site} | {vals} | {rep} |")
            fed = ", ".join(f"{a}: {_fmt(v)}" for a, v in sorted(self.federation_epsilon.items()))
            lines += ["", f"Federation epsilon (maximum over sites): {fed}."]
        else:
            lines.append("No ledger records.")
        lines += ["", "## Findings", ""]
        if self.findings:
            lines.append("| severity | code | strategy | round | site | message |")
            lines.append("|---|---|---|---|---|---|")
            for f in self.findings:
                msg = f.message.replace("|", "\\|").replace("\n", " ")
                lines.append(
                    f"| {f.severity} | {f.code} | {f.strategy or '-'} | "
                    f"{'-' if f.round is None else f.round} | {f.site or '-'} | {msg} |"
                )
        else:
            lines.append("None.")
        lines += [
            "",
            "## Method",
            "",
            "The hash chain, its head anchor and the anchors in metrics.jsonl were verified; each "
            "site's epsilon was recomputed from the ledger (unconfirmed intents counted, "
            "max(intended, confirmed) steps, min(expected, confirmed) survivors) with an RDP "
            "accountant and Opacus' PRV accountant (upper estimate); RDP is an upper bound, so it "
            f"must not be below PRV by more than 2 x {PRV_EPS_ERROR}. Every reported epsilon was "
            "compared with the same accountant's value on the ledger as it stood after that "
            "round. The plot `epsilon_vs_rounds.png` shows the RDP epsilon per site against "
            "rounds, with the reported values as markers.",
            "",
        ]
        return "\n".join(lines)

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        labels = [p.label for p in self.curve]
        x_of = {label: i for i, label in enumerate(labels)}
        sites = sorted({s for p in self.curve for s in p.epsilon})
        for site in sites:
            xs = [x_of[p.label] for p in self.curve if site in p.epsilon]
            ys = [p.epsilon[site] for p in self.curve if site in p.epsilon]
            (line,) = ax.plot(xs, ys, marker=".", label=f"{site} (ledger, rdp)")
            rep = [(x_of[lab], e) for lab, s, e in self.reported if s == site and lab in x_of]
            if rep:
                ax.scatter(
                    [r[0] for r in rep],
                    [r[1] for r in rep],
                    marker="x",
                    color=line.get_color(),
                    label=f"{site} (reported)",
                )
        if self.privacy:
            for key in ("site_budget", "federation_budget", "target_epsilon"):
                value = self.privacy.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    ax.axhline(value, linestyle="--", linewidth=0.8, color="grey")
                    ax.annotate(key, (0, value), fontsize=7, color="grey")
        step = max(1, len(labels) // 12)
        ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=30, fontsize=7)
        ax.set_xlabel("round")
        ax.set_ylabel(f"epsilon (delta={self.delta:g})")
        ax.set_title("Privacy spent per site" + ("" if self.ok else " - audit FAILED"))
        if sites:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------


class _EpsilonCache:
    def __init__(self) -> None:
        self._values: dict[tuple[tuple[PrivacyEvent, ...], float, str], float] = {}

    def __call__(self, events: Iterable[PrivacyEvent], delta: float, accountant: str) -> float:
        key = (canonical_events(events), delta, accountant)
        if key not in self._values:
            self._values[key] = epsilon_of_events(key[0], delta, accountant)
        return self._values[key]


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _select(
    records: Sequence[LedgerRecord], site: str, strategy: str | None, upto: int | None
) -> list[PrivacyEvent]:
    return select_events(records, site, strategy=strategy, upto=upto)


def audit_run(
    run_dir: str | Path,
    *,
    tolerance: float = 1e-6,
    accountants: Sequence[str] = AUDIT_ACCOUNTANTS,
) -> AuditResult:
    """Audit the privacy of the run in ``run_dir`` (see the module docstring for every check).

    ``tolerance`` is the absolute epsilon tolerance for comparisons with reported and configured
    values. Returns an :class:`AuditResult` (findings may be empty); raises ConfigError when
    ``run_dir`` is not a run folder (no readable config.json) or an argument is invalid.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run_dir {run} is not a folder")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
        raise ConfigError(f"tolerance must be a number >= 0, got {tolerance!r}")
    for acc in accountants:
        if acc not in ACCOUNTANTS:
            raise ConfigError(f"accountants must be drawn from {ACCOUNTANTS}, got {acc!r}")
    cfg_path = run / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{run} holds no config.json: not a run folder") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{cfg_path} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path} must hold a JSON object")

    findings: list[Finding] = []
    raw_privacy = config.get("privacy")
    pcfg: PrivacyConfig | None
    try:
        pcfg = PrivacyConfig.from_dict(raw_privacy) if raw_privacy is not None else PrivacyConfig()
    except ConfigError as exc:
        pcfg = None
        findings.append(Finding("CONFIG_INVALID", ERROR, f"config.json privacy section: {exc}"))
    delta = pcfg.delta if pcfg else (_num((raw_privacy or {}).get("delta")) or 1e-5)
    dp_enabled = pcfg.enabled if pcfg else True
    rows = read_jsonl(run / "metrics.jsonl")
    privacy_dict = (
        pcfg.to_dict() if pcfg else (raw_privacy if isinstance(raw_privacy, dict) else None)
    )

    def result(**kw: Any) -> AuditResult:
        return AuditResult(run_dir=run, findings=findings, delta=delta, privacy=privacy_dict, **kw)

    ledger_path = run / LEDGER_FILENAME
    if not ledger_path.exists():
        if dp_enabled:
            findings.append(
                Finding(
                    "LEDGER_MISSING",
                    ERROR,
                    f"privacy level {pcfg.level if pcfg else '?'!r} is configured but "
                    f"{LEDGER_FILENAME} is missing: nothing of what was spent can be verified",
                )
            )
        return result(epsilon={}, federation_epsilon={}, records=0)

    try:
        ledger = PrivacyLedger(ledger_path, readonly=True)
    except (LedgerIntegrityError, ConfigError) as exc:
        findings.append(Finding("CHAIN_BROKEN", ERROR, str(exc)))
        return result(epsilon={}, federation_epsilon={}, records=0)
    with ledger:
        try:
            ledger.verify()
        except LedgerIntegrityError as exc:
            findings.append(Finding("CHAIN_BROKEN", ERROR, str(exc)))
        for row in rows:
            priv = row.get("privacy")
            anchor_raw = _anchor_of(priv) if isinstance(priv, dict) else None
            if anchor_raw is None:
                continue
            try:
                anchor = LedgerHead.from_dict(anchor_raw)
                ledger.check_anchor(anchor)
            except (ConfigError, LedgerIntegrityError, AttributeError) as exc:
                findings.append(
                    Finding(
                        "ANCHOR_MISMATCH",
                        ERROR,
                        f"metrics.jsonl anchor: {exc}",
                        round=_int_or_none(row.get("round")),
                        strategy=_str_or_none(row.get("strategy")),
                    )
                )
        try:
            records = ledger.entries(strict=False)
            raw_rows = ledger.raw_records()
        except LedgerIntegrityError as exc:
            findings.append(Finding("CHAIN_BROKEN", ERROR, str(exc)))
            records, raw_rows = [], []

    eps = _EpsilonCache()
    sites = sorted({r.entry.site for r in records})
    strategies_named = any(r.entry.strategy for r in records)

    # last record id (intent or confirm) of each (strategy, round): the ledger "after that round"
    last_seq: dict[tuple[str, int], int] = {}
    order: list[tuple[str, int]] = []
    for raw in raw_rows:
        key = (str(raw.get("strategy") or ""), raw.get("round"))
        if not isinstance(key[1], int) or not isinstance(raw.get("seq"), int):
            continue
        k = (key[0], key[1])
        if k not in last_seq:
            order.append(k)
        last_seq[k] = max(last_seq.get(k, 0), int(raw["seq"]))

    # recomputed totals
    epsilon: dict[str, dict[str, float]] = {}
    for site in sites:
        events = _select(records, site, None, None)
        epsilon[site] = {acc: eps(events, delta, acc) for acc in accountants}
    federation = {acc: max((epsilon[s][acc] for s in sites), default=0.0) for acc in accountants}
    _check_accountants(epsilon, tolerance, findings)
    if pcfg is not None:
        _check_config(pcfg, records, epsilon, eps, delta, tolerance, findings)
        if not dp_enabled and records:
            findings.append(
                Finding(
                    "CONFIG_MISMATCH",
                    WARNING,
                    f"config.json says privacy.level='none' but the ledger holds {len(records)} "
                    "DP records",
                )
            )
    _check_records(records, findings)
    _check_rounds(records, rows, config, pcfg, dp_enabled, strategies_named, findings)

    # reported epsilons
    reported: list[tuple[str, str, float]] = []
    for row in rows:
        strategy = str(row.get("strategy") or "")
        rnd = _int_or_none(row.get("round"))
        label = _label(strategy, rnd if rnd is not None else -1)
        priv = row.get("privacy")
        if not isinstance(priv, dict):
            if dp_enabled:
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        "metrics row carries no privacy block although DP is configured",
                        round=rnd,
                        strategy=strategy or None,
                    )
                )
            continue
        acc = priv.get("accountant", pcfg.accountant if pcfg else "rdp")
        row_delta = _num(priv.get("delta")) or delta
        scope = priv.get("scope", "ledger")
        row_anchor = _anchor_of(priv)
        upto: int | None
        if isinstance(row_anchor, dict) and isinstance(row_anchor.get("count"), int):
            upto = int(row_anchor["count"])
        else:
            upto = last_seq.get(
                (strategy if strategies_named else "", rnd if rnd is not None else -1)
            )
        if upto is None:
            continue  # reported as MISSING_ROUND
        values = priv.get("epsilon")
        if not isinstance(values, dict):
            findings.append(
                Finding(
                    "EPSILON_NOT_REPORTED",
                    WARNING,
                    "privacy block has no 'epsilon' mapping",
                    round=rnd,
                    strategy=strategy or None,
                )
            )
            continue
        scope_strategy = strategy if scope == "strategy" and strategies_named else None
        for site in sites:
            events = _select(records, site, scope_strategy, upto)
            if site not in values and canonical_events(events):
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        f"site {site!r} has spent privacy but the row reports no epsilon",
                        site=site,
                        round=rnd,
                        strategy=strategy or None,
                    )
                )
        for site, value in values.items():
            v = _num(value)
            if v is None:
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        f"reported epsilon {value!r} is not a number",
                        site=str(site),
                        round=rnd,
                        strategy=strategy or None,
                    )
                )
                continue
            reported.append((label, str(site), v))
            use = acc if acc in ACCOUNTANTS else "rdp"
            events = _select(records, str(site), scope_strategy, upto)
            recomputed = eps(events, row_delta, use)
            if acc not in ACCOUNTANTS:
                recomputed = min(recomputed, eps(events, row_delta, "prv"))
            where = f"(accountant {acc}, δ={row_delta:g}, ledger up to record {upto})"
            if v < recomputed - tolerance:
                findings.append(
                    Finding(
                        "EPSILON_UNDER_REPORTED",
                        ERROR,
                        f"reported ε={v:.6g} is below the ε={recomputed:.6g} recomputed from the "
                        f"ledger {where}",
                        site=str(site),
                        round=rnd,
                        strategy=strategy or None,
                    )
                )
            elif v > recomputed + tolerance:
                findings.append(
                    Finding(
                        "EPSILON_OVER_REPORTED",
                        ERROR,
                        f"reported ε={v:.6g} exceeds the ε={recomputed:.6g} recomputed from the "
                        f"ledger {where}: the ledger is missing spend the run accounted for",
                        site=str(site),
                        round=rnd,
                        strategy=strategy or None,
                    )
                )

    curve = []
    for strategy, rnd in order:
        upto = last_seq[(strategy, rnd)]
        point = {}
        for site in sites:
            events = _select(records, site, None, upto)
            if canonical_events(events):
                point[site] = eps(events, delta, "rdp")
        curve.append(CurvePoint(_label(strategy, rnd), strategy, rnd, point))
    findings.sort(key=lambda f: (f.severity != ERROR, f.strategy or "", f.round or -1, f.code))
    return result(
        epsilon=epsilon,
        federation_epsilon=federation,
        records=len(raw_rows),
        curve=curve,
        reported=reported,
    )


def _anchor_of(privacy: dict[str, Any]) -> Any:
    """The ledger anchor a metrics row carries (``"ledger_head"`` or ``"ledger"``), if any."""
    return privacy.get("ledger_head", privacy.get("ledger"))


def _where(entry: LedgerEntry) -> dict[str, Any]:
    return {"site": entry.site, "round": entry.round, "strategy": entry.strategy or None}


def _label(strategy: str, rnd: int) -> str:
    return f"{strategy}:{rnd}" if strategy else str(rnd)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


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
        if pcfg.level == "site" and e.sample_rate > pcfg.site_sample_rate * (1 + 1e-12):
            findings.append(
                Finding(
                    "SAMPLING_ABOVE_CONFIG",
                    ERROR,
                    f"record {r.id} sampled sites at rate {e.sample_rate:g}, above the "
                    f"configured site_sample_rate {pcfg.site_sample_rate:g}",
                    **where,
                )
            )
    per_site = {
        site: eps(_select(records, site, None, None), delta, pcfg.accountant) for site in epsilon
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


def _check_rounds(
    records: Sequence[LedgerRecord],
    rows: Sequence[dict[str, Any]],
    config: dict[str, Any],
    pcfg: PrivacyConfig | None,
    dp_enabled: bool,
    strategies_named: bool,
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
        if rnd not in by_strategy.get(s, set()) and (s, rnd) not in reported_missing:
            reported_missing.add((s, rnd))
            findings.append(
                Finding(
                    "MISSING_ROUND",
                    ERROR,
                    f"round {rnd} appears in metrics.jsonl but the ledger has no record of it",
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
                    f"the ledger has no record of round {gap} (rounds must be contiguous from 0; "
                    f"recorded: {sorted(rounds)[:5]}...{max(rounds)})",
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
                        f"the ledger records round(s) {extra} but config.json plans "
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
                        f"site {site!r} has no record in round {rnd}: site-level DP accounts "
                        "every site in every round (Poisson participation)",
                        site=site,
                        round=rnd,
                        strategy=s or None,
                    )
                )


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``secure-fl audit RUN_DIR``: 0 when the audit has no finding, 1 on any finding, 2 on a
    usage error (bad arguments, no run folder, no readable config.json)."""
    parser = argparse.ArgumentParser(
        prog="secure-fl audit",
        description="Verify a run's privacy ledger and recompute every site's epsilon.",
    )
    parser.add_argument("run_dir", help="the run folder (config.json, metrics.jsonl, ledger)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-6,
        help="absolute epsilon tolerance for comparisons (default 1e-6)",
    )
    parser.add_argument("--no-report", action="store_true", help="do not write audit.md/.json/.png")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    try:
        result = audit_run(args.run_dir, tolerance=args.tolerance)
    except ConfigError as exc:
        print(f"secure-fl audit: {exc}", file=sys.stderr)
        return 2
    if not args.no_report:
        paths = result.write_report()
        print(f"report: {paths['markdown']}  {paths['json']}  {paths['png']}")
    for site, by_acc in sorted(result.epsilon.items()):
        values = "  ".join(f"{a}={_fmt(v)}" for a, v in sorted(by_acc.items()))
        print(f"site {site}: epsilon {values} (delta={result.delta:g})")
    for f in result.findings:
        where = " ".join(
            x
            for x in (
                f"strategy={f.strategy}" if f.strategy else "",
                f"round={f.round}" if f.round is not None else "",
                f"site={f.site}" if f.site else "",
            )
            if x
        )
        print(f"{f.severity.upper()} {f.code} {where}: {f.message}")
    print("audit: PASS" if result.ok else f"audit: FAIL ({len(result.findings)} finding(s))")
    return 0 if result.ok else 1
