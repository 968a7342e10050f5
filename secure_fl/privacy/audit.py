"""Audit of a run's privacy: ``secure-fl audit RUN_DIR``.

Inputs in the run folder: ``privacy_ledger.sqlite`` (+ its ``.head`` anchor), ``config.json``
(``"privacy"``: :meth:`PrivacyConfig.to_dict`, ``"rounds"``, ``"train"``, ``"data"``, ``"seed"``,
``"strategies"``), ``metrics.jsonl`` (rows with DP carry ``"privacy": {"epsilon": {site: eps},
"delta": d, "accountant": name, "ledger_head": {"count", "hash"}}``, optionally ``"scope"``:
``"ledger"`` (default: the site's whole spend so far) or ``"strategy"``), ``stopped.json`` when a
budget stopped the run, and the datalist named by ``config.json`` (``data.datalist``, or
``data.synthetic_dir/datalist.json``; ``audit_run(datalist=...)`` / ``--datalist`` override it).

Status: ``PASS`` (no error or warning; ``info`` lines may explain, e.g. a budget stop), ``FAIL``
(any error or warning) or ``NO DP`` (``privacy.level = "none"``: epsilon = infinity; never PASS).
Exit status of ``secure-fl audit``: 0 PASS, 1 FAIL, 2 usage error, 3 NO DP.

What the audit checks (each failure is a :class:`Finding`):

* the hash chain, the head anchor and every anchor copied into metrics.jsonl (``CHAIN_BROKEN``,
  ``ANCHOR_MISMATCH``); the anchors of successive DP rows must grow (``ANCHOR_NOT_MONOTONE``) and
  each must cover every ledger record of its own round (``ANCHOR_STALE``: a row re-using an
  earlier round's anchor); a DP row without an anchor is ``ANCHOR_MISSING`` (warning);
* the mechanism parameters re-derived from config.json and the datalist split - not taken from the
  ledger, which whoever can write the run folder can rebuild with a valid chain: at sample level
  the sampling rate ``q = batch_size / n_train`` and ``local_epochs * ceil(1/q)`` steps per round
  from each site's number of training cases, at site level ``q = 1`` (no amplification: the
  server sees who takes part) and one step per round when every site takes part; the least noise
  multiplier the configuration asks for (configured, or recalibrated here from
  ``target_epsilon``). A record below them is ``SAMPLING_BELOW_DERIVED``, ``STEPS_BELOW_DERIVED``
  or ``NOISE_BELOW_CONFIG``, and every epsilon below is computed with ``max(ledger, derived)``
  sampling rate and steps. Without the datalist (``DATALIST_UNAVAILABLE``, warning) sample-level
  ``q`` and steps are the ledger's;
* never more noise than the audit can justify: each record is accounted with ``min(ledger,
  justified)`` noise multiplier, the justified one being the calibrated (or configured) multiplier,
  raised only by a resume recalibration that the runner recorded (``params["resume_scale"]``,
  ``params["resume_from_round"]``) and the audit re-derives itself from the ledger's earlier records
  with :func:`secure_fl.privacy.budget.resume_noise_scale`; a record above it (beyond
  ``NOISE_REL_TOL``) is ``NOISE_ABOVE_DERIVED`` (error: e.g. a ledger rebuilt with inflated noise);
* every site's epsilon recomputed with two independent accountants (``rdp``, implemented in
  :mod:`secure_fl.privacy.accounting`, and Opacus ``prv``); they must agree within the known gap,
  RDP being an upper bound (``ACCOUNTANT_DISAGREEMENT``);
* every reported epsilon against the recomputed one at the *configuration's* delta with the
  *configuration's* accountant, on the ledger as it stood after that row's round: below it
  (``EPSILON_UNDER_REPORTED``) or above it - spend the ledger does not hold, e.g. a truncated
  tail (``EPSILON_OVER_REPORTED``); a row claiming another delta or accountant
  (``REPORT_DELTA_MISMATCH``, ``REPORT_ACCOUNTANT_MISMATCH``); DP rows without a report
  (``EPSILON_NOT_REPORTED``, warning);
* missing rounds: a metrics round without ledger records, ledger rounds not contiguous from 1, a
  site missing from a round in which it trains (``MISSING_ROUND``); a metrics round below 1
  (``ROUND_NUMBERING``);
* unconfirmed intents (a crash; counted in full) and confirmations with more steps than intended
  (``UNCONFIRMED_INTENT``, ``STEPS_ABOVE_INTENT``, warnings);
* where the noise came from: a record drawn from a seeded generator is ``NOISE_PREDICTABLE``
  (error: anyone with the seed can subtract it); records that do not say (written before noise
  sources were recorded, when DP noise derived from the run seed) are ``NOISE_SOURCE_UNKNOWN``;
* level/mechanism/clip/delta differing from the configuration (``CONFIG_MISMATCH``); survivors
  below ``params["threshold"]`` (``SURVIVORS_BELOW_THRESHOLD``);
* recomputed epsilon above ``target_epsilon`` or a budget (``EPSILON_ABOVE_TARGET``,
  ``BUDGET_EXCEEDED``); a budget stop is explained (``BUDGET_STOP``, info, naming the round and
  the budget check's numbers) when stopped.json names the round right after the ledger's last
  (``STOP_INCONSISTENT`` otherwise) and one more round would really take a site or the federation
  over a budget (``STOP_UNJUSTIFIED``, warning, otherwise); a ledger that ends early without one
  is ``RUN_INCOMPLETE`` (warning: an unfinished run's spend is not final);
* how far the run got by its own artefacts: a ``checkpoints/<strategy>.pt`` round (loaded with
  ``weights_only=True``) beyond what the ledger and metrics.jsonl hold, or ``models/<strategy>.pt``
  / ``report.md`` of a run whose ledger ends early without a budget stop, is
  ``ARTEFACTS_AHEAD_OF_LEDGER`` (error: a truncated tail); an unreadable checkpoint is
  ``CHECKPOINT_UNREADABLE`` (warning).

Rounds are numbered from 1 in everything the audit writes (findings, audit.md/.json, the plot),
as in metrics.jsonl and stopped.json; the ledger stores the 0-based index (round - 1) and the
audit maps one onto the other.

What it cannot detect: a run folder rewritten *consistently* - config.json, datalist, ledger,
head file and metrics together (keep the config and the ledger head outside the run folder, e.g.
at every site); noise that was recorded but not added (the audit sees records, not tensors); at
site level with ``site_sample_rate < 1``, which sites took part in a round (steps 0 or 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from secure_fl.errors import ConfigError
from secure_fl.jsonl import read_jsonl
from secure_fl.privacy.accounting import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    PrivacyEvent,
    calibrate_noise,
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
INFO = "info"
"""Severity of an explanation (e.g. a budget stop): it does not fail the audit."""

PASS, FAIL, NO_DP = "PASS", "FAIL", "NO DP"
EXIT_STATUS: dict[str, int] = {PASS: 0, FAIL: 1, NO_DP: 3}
"""Exit status of ``secure-fl audit`` per status (2: usage error)."""

AUDIT_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""The two independent accountants every site's epsilon is recomputed with."""


@dataclass(frozen=True)
class Finding:
    """One problem the audit found. ``severity`` is ``"error"``, ``"warning"`` or ``"info"`` (an
    explanation that does not fail the audit)."""

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
    dp: bool = True

    @property
    def problems(self) -> list[Finding]:
        """The findings that fail the audit (errors and warnings; not ``info``)."""
        return [f for f in self.findings if f.severity != INFO]

    @property
    def status(self) -> str:
        """``"NO DP"`` without differential privacy (epsilon = infinity), else ``"PASS"`` when
        no error or warning was found, else ``"FAIL"``."""
        if not self.dp:
            return NO_DP
        return FAIL if self.problems else PASS

    @property
    def ok(self) -> bool:
        """True when the status is PASS: DP configured and no error or warning."""
        return self.status == PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "status": self.status,
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
        if self.status == NO_DP:
            status = "NO DP - no differential privacy: epsilon = infinity"
        elif self.ok:
            status = "PASS - no errors or warnings"
        else:
            status = f"FAIL - {len(self.problems)} finding(s)"
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
            "The hash chain, its head anchor and the anchors in metrics.jsonl were verified "
            "(growing from row to row, each covering its round); the sampling rate, steps and "
            "least noise were re-derived from config.json and the datalist split and each "
            "site's epsilon recomputed from the ledger with max(ledger, derived) sampling rate "
            "and steps, min(ledger, derived) noise (a resume recalibration only as re-derived "
            "from the ledger) (unconfirmed intents counted, max(intended, confirmed) steps, "
            "min(expected, confirmed) survivors) with an RDP accountant and Opacus' PRV "
            "accountant (upper estimate); RDP is an upper bound, so it must not be below PRV by "
            f"more than 2 x {PRV_EPS_ERROR}. Every reported epsilon was compared with the value "
            "at the configuration's delta and accountant on the ledger as it stood after that "
            "round. Not detectable: a run folder rewritten consistently (config, datalist, "
            "ledger, head and metrics together), noise recorded but not added. The plot "
            "`epsilon_vs_rounds.png` shows the RDP epsilon per site against rounds, with the "
            "reported values as markers.",
            "",
        ]
        return "\n".join(lines)

    def figure(self) -> Any:
        """The matplotlib figure of ``epsilon_vs_rounds.png``: the RDP epsilon per site against
        rounds (numbered from 1; ``strategy:round`` labels when the ledger holds several
        strategies), reported values as crosses, budgets as dashed lines, integer round ticks,
        the legend beside the axes so that it hides no line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        labels = [p.label for p in self.curve]
        one_strategy = len({p.strategy for p in self.curve}) <= 1
        if one_strategy:  # x is the round number itself
            x_of = {p.label: float(p.round) for p in self.curve}
        else:
            x_of = {label: float(i + 1) for i, label in enumerate(labels)}
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
                    ax.annotate(
                        key,
                        (0.01, value),
                        xycoords=("axes fraction", "data"),
                        fontsize=7,
                        color="grey",
                        va="bottom",
                    )
        if one_strategy:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            step = max(1, len(labels) // 12)
            ax.set_xticks(
                [float(i + 1) for i in range(0, len(labels), step)],
                labels[::step],
                rotation=30,
                fontsize=7,
            )
        ax.set_xlabel("round")
        ax.set_ylabel(f"epsilon (delta={self.delta:g})")
        ax.set_title(f"Privacy spent per site - audit {self.status}")
        if sites:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    def _plot(self, path: Path) -> None:
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=110, bbox_inches="tight")
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


def audit_run(
    run_dir: str | Path,
    *,
    tolerance: float = 1e-6,
    accountants: Sequence[str] = AUDIT_ACCOUNTANTS,
    datalist: str | Path | None = None,
) -> AuditResult:
    """Audit the privacy of the run in ``run_dir`` (see the module docstring for every check).

    Guarantee: against anyone who can edit some files of the run folder (metrics.jsonl, the
    ledger, its head) but not all of them consistently with config.json and the datalist, a run
    that under-states its spend does not PASS. ``tolerance`` is the absolute epsilon tolerance
    for comparisons with reported and configured values; ``datalist`` overrides the datalist named
    in config.json (the auditor's own copy). Returns an :class:`AuditResult` (``status`` PASS,
    FAIL or NO DP); raises ConfigError when ``run_dir`` is not a run folder (no readable
    config.json) or an argument is invalid.
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
    config_accountant = pcfg.accountant if pcfg else "rdp"
    dp_enabled = pcfg.enabled if pcfg else True
    # metrics.jsonl numbers rounds from 1, the ledger from 0: every check below works on the
    # ledger's index (row round - 1); findings are numbered from 1 again at the end.
    raw_metrics = read_jsonl(run / "metrics.jsonl")
    rows = [_to_index(row) for row in raw_metrics]
    privacy_dict = (
        pcfg.to_dict() if pcfg else (raw_privacy if isinstance(raw_privacy, dict) else None)
    )
    if not dp_enabled:
        findings.append(
            Finding(
                "NO_DP",
                ERROR,
                "no differential privacy: epsilon = infinity (config.json privacy.level='none'); "
                "the released models carry no DP guarantee for any patient or site",
            )
        )

    def result(**kw: Any) -> AuditResult:
        if not dp_enabled:
            kw["federation_epsilon"] = {acc: math.inf for acc in accountants}
        return AuditResult(
            run_dir=run,
            findings=findings,
            delta=delta,
            privacy=privacy_dict,
            dp=dp_enabled,
            **kw,
        )

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
    anchors: list[tuple[dict[str, Any], LedgerHead | None]] = []
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
                anchors.append((row, anchor))
            except (ConfigError, LedgerIntegrityError, AttributeError) as exc:
                anchors.append((row, None))
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

    _check_numbering(raw_metrics, findings)
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

    derived: dict[str, Derived] = {}
    schedule: dict[int, set[str]] | None = None
    caps: dict[int, float] = {}
    if dp_enabled and pcfg is not None and records:
        derived, schedule = _derive(config, pcfg, sites, datalist, findings)
        _check_derived(records, derived, findings)
        caps = _justify_noise(records, derived, schedule, pcfg, config, findings)
    _check_anchors(anchors, last_seq, strategies_named, findings)

    # recomputed totals
    epsilon: dict[str, dict[str, float]] = {}
    for site in sites:
        events = _select(records, site, None, None, derived, caps)
        epsilon[site] = {acc: eps(events, delta, acc) for acc in accountants}
    federation = {acc: max((epsilon[s][acc] for s in sites), default=0.0) for acc in accountants}
    _check_accountants(epsilon, tolerance, findings)
    if pcfg is not None:
        _check_config(pcfg, records, epsilon, eps, delta, tolerance, derived, caps, findings)
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
    _check_noise_source(records, findings)
    _check_rounds(records, rows, config, pcfg, dp_enabled, strategies_named, schedule, findings)
    refused = _check_stop(run, records, config, pcfg, epsilon, findings)
    if refused is not None and pcfg is not None and records:
        _check_stop_justified(
            records, refused, pcfg, derived, caps, schedule, eps, tolerance, findings
        )
    if dp_enabled:
        _check_progress(run, records, rows, config, strategies_named, findings)

    # reported epsilons: always at the configuration's delta, with its accountant
    reported: list[tuple[str, str, float]] = []
    for row in rows:
        strategy = str(row.get("strategy") or "")
        rnd = _int_or_none(row.get("round"))
        label = _label(strategy, rnd + 1 if rnd is not None else 0)
        where_row: dict[str, Any] = {"round": rnd, "strategy": strategy or None}
        priv = row.get("privacy")
        if not isinstance(priv, dict):
            if dp_enabled:
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        "metrics row carries no privacy block although DP is configured",
                        **where_row,
                    )
                )
            continue
        claimed_acc = priv.get("accountant", config_accountant)
        if claimed_acc != config_accountant:
            findings.append(
                Finding(
                    "REPORT_ACCOUNTANT_MISMATCH",
                    ERROR,
                    f"the row reports epsilon with accountant {claimed_acc!r}, the configuration "
                    f"says {config_accountant!r}: compared with {config_accountant!r}",
                    **where_row,
                )
            )
        claimed_delta = _num(priv.get("delta"))
        if claimed_delta is None or not math.isclose(claimed_delta, delta, rel_tol=1e-9):
            findings.append(
                Finding(
                    "REPORT_DELTA_MISMATCH",
                    ERROR,
                    f"the row reports epsilon at delta={priv.get('delta')!r}, the configuration "
                    f"says {delta:g}: compared at {delta:g}",
                    **where_row,
                )
            )
        scope = priv.get("scope", "ledger")
        row_anchor = _anchor_of(priv)
        if row_anchor is None and dp_enabled:
            findings.append(
                Finding(
                    "ANCHOR_MISSING",
                    WARNING,
                    "the row carries no ledger anchor (privacy.ledger_head): a truncated ledger "
                    "cannot be told from this row; compared with the ledger after its round",
                    **where_row,
                )
            )
        round_seq = last_seq.get(
            (strategy if strategies_named else "", rnd if rnd is not None else -1)
        )
        upto: int | None = round_seq
        if isinstance(row_anchor, dict) and isinstance(row_anchor.get("count"), int):
            upto = max(int(row_anchor["count"]), round_seq or 0)
        if upto is None:
            continue  # reported as MISSING_ROUND
        values = priv.get("epsilon")
        if not isinstance(values, dict):
            findings.append(
                Finding(
                    "EPSILON_NOT_REPORTED",
                    WARNING,
                    "privacy block has no 'epsilon' mapping",
                    **where_row,
                )
            )
            continue
        scope_strategy = strategy if scope == "strategy" and strategies_named else None
        for site in sites:
            events = _select(records, site, scope_strategy, upto, derived, caps)
            if site not in values and canonical_events(events):
                findings.append(
                    Finding(
                        "EPSILON_NOT_REPORTED",
                        WARNING,
                        f"site {site!r} has spent privacy but the row reports no epsilon",
                        site=site,
                        **where_row,
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
                        **where_row,
                    )
                )
                continue
            reported.append((label, str(site), v))
            events = _select(records, str(site), scope_strategy, upto, derived, caps)
            recomputed = eps(events, delta, config_accountant)
            where = f"(accountant {config_accountant}, δ={delta:g}, ledger up to record {upto})"
            if v < recomputed - tolerance:
                findings.append(
                    Finding(
                        "EPSILON_UNDER_REPORTED",
                        ERROR,
                        f"reported ε={v:.6g} is below the ε={recomputed:.6g} recomputed from the "
                        f"ledger {where}",
                        site=str(site),
                        **where_row,
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
                        **where_row,
                    )
                )

    curve = []
    for strategy, rnd in order:
        upto_seq = last_seq[(strategy, rnd)]
        point = {}
        for site in sites:
            events = _select(records, site, None, upto_seq, derived, caps)
            if canonical_events(events):
                point[site] = eps(events, delta, "rdp")
        curve.append(CurvePoint(_label(strategy, rnd + 1), strategy, rnd + 1, point))
    rank = {ERROR: 0, WARNING: 1, INFO: 2}
    findings[:] = [f if f.round is None else replace(f, round=f.round + 1) for f in findings]
    findings.sort(key=lambda f: (rank.get(f.severity, 3), f.strategy or "", f.round or -1, f.code))
    return result(
        epsilon=epsilon,
        federation_epsilon=federation,
        records=len(raw_rows),
        curve=curve,
        reported=reported,
    )


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
            splits = split_by_site(
                load_datalist(path, must_exist=False),
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

    if strategy == "centralized":
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


def _check_anchors(
    anchors: Sequence[tuple[dict[str, Any], LedgerHead | None]],
    last_seq: Mapping[tuple[str, int], int],
    strategies_named: bool,
    findings: list[Finding],
) -> None:
    """Anchors of successive rows must grow, and each must cover its own round's records."""
    previous: int | None = None
    for row, anchor in anchors:
        if anchor is None:
            continue
        rnd = _int_or_none(row.get("round"))
        strategy = str(row.get("strategy") or "")
        where: dict[str, Any] = {"round": rnd, "strategy": strategy or None}
        if previous is not None and anchor.count <= previous:
            findings.append(
                Finding(
                    "ANCHOR_NOT_MONOTONE",
                    ERROR,
                    f"the row's ledger anchor (record {anchor.count}) does not come after the "
                    f"previous row's (record {previous}): an anchor was re-used or rows reordered",
                    **where,
                )
            )
        previous = anchor.count if previous is None else max(previous, anchor.count)
        needed = last_seq.get(
            (strategy if strategies_named else "", rnd if rnd is not None else -1)
        )
        if needed is not None and anchor.count < needed:
            findings.append(
                Finding(
                    "ANCHOR_STALE",
                    ERROR,
                    f"the row's ledger anchor stops at record {anchor.count}, before record "
                    f"{needed}, the last of its own round: it is an earlier round's anchor",
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


def _check_stop(
    run: Path,
    records: Sequence[LedgerRecord],
    config: Mapping[str, Any],
    pcfg: PrivacyConfig | None,
    epsilon: Mapping[str, Mapping[str, float]],
    findings: list[Finding],
) -> int | None:
    """Explain a budget stop (``stopped.json``), or a ledger that ends before the planned rounds.

    Returns the refused round's index when stopped.json names the round right after the
    ledger's last (or the last itself when that round's intents are all unconfirmed: a crashed
    round refused on resume), else None."""
    planned = _int_or_none(config.get("rounds"))
    last = max((r.entry.round for r in records), default=-1)
    path = run / "stopped.json"
    stop: Any = None
    if path.exists():
        try:
            stop = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stop = None
    if isinstance(stop, dict):
        number = _int_or_none(stop.get("round"))  # numbered from 1, as in metrics.jsonl
        rnd = None if number is None else number - 1
        strategy = _str_or_none(stop.get("strategy"))
        budgets = []
        if pcfg is not None:
            for name in ("site_budget", "federation_budget", "target_epsilon"):
                value = getattr(pcfg, name)
                if value is not None:
                    budgets.append(f"{name}={value:g}")
        acc = pcfg.accountant if pcfg else "rdp"
        spent = max((v.get(acc, v.get("rdp", 0.0)) for v in epsilon.values()), default=0.0)
        findings.append(
            Finding(
                "BUDGET_STOP",
                INFO,
                f"the run was stopped by its privacy budget ({', '.join(budgets) or '?'}) before "
                f"round {'?' if number is None else number} of {planned}, "
                f"after spending ε={spent:.4g}: "
                f"{stop.get('message', '')}",
                round=rnd,
                strategy=strategy,
            )
        )
        crashed = [r for r in records if r.entry.round == last]
        rerun = rnd == last and not any(r.confirmed for r in crashed)
        if rnd is not None and last >= rnd and not rerun:
            findings.append(
                Finding(
                    "STOP_INCONSISTENT",
                    WARNING,
                    f"stopped.json says round {number} was refused, but the ledger records "
                    f"round {last + 1}",
                    round=rnd,
                    strategy=strategy,
                )
            )
        elif rnd is not None and records and last < rnd - 1:
            findings.append(
                Finding(
                    "STOP_INCONSISTENT",
                    WARNING,
                    f"stopped.json says round {number} was refused, but the ledger ends at "
                    f"round {last + 1}: a budget refuses the round right after the last one "
                    f"run, so rounds {last + 2}..{rnd} are missing from the ledger",
                    round=rnd,
                    strategy=strategy,
                )
            )
        else:
            return rnd
    elif stop is not None or path.exists():
        findings.append(Finding("STOP_INCONSISTENT", WARNING, f"{path.name} is unreadable"))
    elif records and planned is not None and last < planned - 1:
        findings.append(
            Finding(
                "RUN_INCOMPLETE",
                WARNING,
                f"the ledger ends at round {last + 1} of the {planned} planned without a budget "
                "stop (stopped.json): the run was interrupted, is still running, or its tail "
                "was removed; epsilon is what the ledger holds so far, not the run's final spend",
                round=last,
            )
        )
    return None


def _check_stop_justified(
    records: Sequence[LedgerRecord],
    refused: int,
    pcfg: PrivacyConfig,
    derived: Mapping[str, Derived],
    caps: Mapping[int, float],
    schedule: Mapping[int, set[str]] | None,
    eps: _EpsilonCache,
    tolerance: float,
    findings: list[Finding],
) -> None:
    """A budget stop must be re-derivable: the runner refuses round ``refused`` (0-based) only
    when its planned records would take a site over ``site_budget`` / ``target_epsilon`` or the
    federation over ``federation_budget``. Each site that trains in that round (config.json and
    the datalist; every site at site level) is projected with one more round like its latest
    record (accounted as the audit accounts it; at least the re-derived sampling rate and steps,
    one step at site level). When no site and not the federation would go over,
    stopped.json does not explain the early end (``STOP_UNJUSTIFIED``, warning: e.g. a forged
    stop covering a truncated tail)."""
    site_budget = pcfg.site_budget
    if pcfg.target_epsilon is not None:
        cap = pcfg.target_epsilon
        site_budget = cap if site_budget is None else min(site_budget, cap)
    sites = sorted({r.entry.site for r in records} | set(derived))
    if pcfg.level == "sample" and schedule is not None and refused in schedule:
        training = sorted(schedule[refused])
    else:
        training = sites
    projected: dict[str, float] = {}
    for site in sites:
        events = _select(records, site, None, None, derived, caps)
        if site in training:
            own = [r for r in records if r.entry.site == site]
            d = derived.get(site)
            if not own:
                return  # nothing to project a fresh site's round from: not verifiable
            latest = max(own, key=lambda rec: rec.id)
            (nxt,) = _select([latest], site, None, None, derived, caps)
            steps = max(nxt.steps, 1, (d.steps or 0) if d is not None else 0)
            events = [*events, replace(nxt, steps=steps)]
        projected[site] = eps(events, pcfg.delta, pcfg.accountant)
    over_site = site_budget is not None and any(
        projected[s] > site_budget - tolerance for s in training if s in projected
    )
    worst = max(projected.values(), default=0.0)
    over_fed = pcfg.federation_budget is not None and worst > pcfg.federation_budget - tolerance
    if over_site or over_fed:
        return
    budgets = ", ".join(
        f"{name}={value:g}"
        for name, value in (
            ("site_budget", pcfg.site_budget),
            ("target_epsilon", pcfg.target_epsilon),
            ("federation_budget", pcfg.federation_budget),
        )
        if value is not None
    )
    findings.append(
        Finding(
            "STOP_UNJUSTIFIED",
            WARNING,
            f"stopped.json says a privacy budget refused round {refused + 1}, but one more round "
            f"brings the worst site only to ε={worst:.6g} ({pcfg.accountant}), within "
            f"{budgets or 'no budget at all'}: the stop does not explain why the ledger ends early",
            round=refused,
        )
    )


def _checkpoint_round(path: Path) -> tuple[int | None, str]:
    """The ``round`` (0-based index of the last finished round) of a runner checkpoint
    (``checkpoints/<strategy>.pt``, :func:`secure_fl.training.runner._save_checkpoint`), loaded
    with ``weights_only=True`` (no pickled code runs). ``(None, why)`` when unreadable."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency of the runner
        return None, f"torch is not importable ({exc})"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a malformed file
        return None, f"{type(exc).__name__}: {exc}"
    value = data.get("round") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None, f"it holds no valid 'round' (got {value!r})"
    return value, ""


def _check_progress(
    run: Path,
    records: Sequence[LedgerRecord],
    rows: Sequence[dict[str, Any]],
    config: Mapping[str, Any],
    strategies_named: bool,
    findings: list[Finding],
) -> None:
    """The run's own artefacts that record how far it got, against the ledger and metrics.jsonl.

    The runner confirms a round in the ledger, appends its metrics line and only then writes
    ``checkpoints/<strategy>.pt`` (holding the round); ``models/<strategy>.pt`` and ``report.md``
    are written once every planned round ran (or a budget stopped the run: ``stopped.json``). A
    checkpoint of a later round than the ledger and metrics.jsonl hold, or final models and a
    report of a run whose ledger ends early without a budget stop, mean records were removed:
    ``ARTEFACTS_AHEAD_OF_LEDGER`` (error; e.g. a tail truncated to under-state epsilon). An
    unreadable checkpoint is ``CHECKPOINT_UNREADABLE`` (warning)."""
    planned = _int_or_none(config.get("rounds"))
    stopped = (run / "stopped.json").exists()
    raw = config.get("strategies")
    names = [s for s in raw if isinstance(s, str) and s] if isinstance(raw, list) else []
    names = names or sorted({r.entry.strategy for r in records if r.entry.strategy}) or ["fedavg"]
    for name in names:
        ledger_last = max(
            (r.entry.round for r in records if not strategies_named or r.entry.strategy == name),
            default=-1,
        )
        metrics_last = max(
            (
                rnd
                for row in rows
                if (rnd := _int_or_none(row.get("round"))) is not None
                and str(row.get("strategy") or name) == name
            ),
            default=-1,
        )
        held = min(ledger_last, metrics_last)
        where: dict[str, Any] = {"strategy": name if strategies_named else None}
        ckpt = run / "checkpoints" / f"{name}.pt"
        if ckpt.is_file():
            done, why = _checkpoint_round(ckpt)
            if done is None:
                findings.append(
                    Finding(
                        "CHECKPOINT_UNREADABLE",
                        WARNING,
                        f"checkpoints/{ckpt.name} is unreadable ({why}): how far the run got "
                        "cannot be checked against the ledger",
                        **where,
                    )
                )
            elif done > held:
                findings.append(
                    Finding(
                        "ARTEFACTS_AHEAD_OF_LEDGER",
                        ERROR,
                        f"checkpoints/{ckpt.name} says round {done + 1} finished, but the ledger "
                        f"records rounds up to {ledger_last + 1} and metrics.jsonl up to "
                        f"{metrics_last + 1}: the ledger under-records the run (a truncated tail)",
                        round=held + 1,
                        **where,
                    )
                )
        finals = [p for p in (run / "models" / f"{name}.pt", run / "report.md") if p.is_file()]
        if finals and not stopped and planned is not None and held < planned - 1:
            shown = ", ".join(str(p.relative_to(run)) for p in finals)
            findings.append(
                Finding(
                    "ARTEFACTS_AHEAD_OF_LEDGER",
                    ERROR,
                    f"{shown} exist: they are written once all {planned} planned rounds ran (or "
                    f"a budget stopped the run, which stopped.json would say), but the ledger "
                    f"records rounds up to {ledger_last + 1} and metrics.jsonl up to "
                    f"{metrics_last + 1}: the ledger under-records the run (a truncated tail; "
                    "or an extended run interrupted before it finished: resume it)",
                    round=held + 1,
                    **where,
                )
            )


def _anchor_of(privacy: dict[str, Any]) -> Any:
    """The ledger anchor a metrics row carries (``"ledger_head"`` or ``"ledger"``), if any."""
    return privacy.get("ledger_head", privacy.get("ledger"))


def _where(entry: LedgerEntry) -> dict[str, Any]:
    return {"site": entry.site, "round": entry.round, "strategy": entry.strategy or None}


def _label(strategy: str, number: int) -> str:
    """The plot label of round ``number`` (numbered from 1) of ``strategy``."""
    return f"{strategy}:{number}" if strategy else str(number)


def _to_index(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with its ``round`` (numbered from 1) turned into the ledger's 0-based index."""
    rnd = _int_or_none(row.get("round"))
    return row if rnd is None else {**row, "round": rnd - 1}


def _check_numbering(rows: Sequence[dict[str, Any]], findings: list[Finding]) -> None:
    """metrics.jsonl numbers rounds from 1; a row with round < 1 was written by an older
    secure-fl (rounds from 0) or edited: its rows cannot be matched with the ledger's rounds."""
    bad = [r["round"] for r in rows if isinstance(r.get("round"), int) and r["round"] < 1]
    if bad:
        findings.append(
            Finding(
                "ROUND_NUMBERING",
                ERROR,
                f"metrics.jsonl has round {bad[0]}: rounds are numbered from 1 (a run written "
                "by a secure-fl that numbered them from 0, or an edited file); its rows are "
                "compared with the ledger's round - 1",
            )
        )


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
    """``secure-fl audit RUN_DIR``. Exit status: 0 PASS (no error or warning; info lines may
    explain), 1 FAIL (any error or warning), 2 usage error (bad arguments, no run folder, no
    readable config.json), 3 NO DP (the run applied no differential privacy: epsilon =
    infinity)."""
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
    parser.add_argument(
        "--datalist",
        default=None,
        help="the datalist to re-derive sampling rates and steps from (default: config.json's)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    try:
        result = audit_run(args.run_dir, tolerance=args.tolerance, datalist=args.datalist)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
    if result.status == NO_DP:
        print("audit: NO DP (no differential privacy: epsilon = infinity)")
    elif result.ok:
        print("audit: PASS")
    else:
        print(f"audit: FAIL ({len(result.problems)} finding(s))")
    return EXIT_STATUS[result.status]
