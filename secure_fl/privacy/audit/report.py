"""The audit's result and its rendering: :class:`AuditResult` (status, ``audit.json``, ``audit.md``
and the ``epsilon_vs_rounds.png`` plot).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.privacy.accounting import PRV_EPS_ERROR
from secure_fl.privacy.audit.model import FAIL, INFO, NO_DP, PASS, CurvePoint, Finding


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
