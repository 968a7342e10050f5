"""The benchmark's outputs: ``summary.json``, ``summary.md`` and the PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from secure_fl.bench.profiles import COHORT_EPSILON, GOAL_EPSILON, BenchProfile

MODE_LABELS = {
    "sample": "sample-level DP-SGD",
    "sample-ft": "sample-level DP-SGD, pretrained + fine-tuned",
    "site": "site-level DP-FedAvg (central)",
    "site-distributed": "site-level DP-FedAvg (distributed)",
    "none": "FedAvg, no DP",
    "local": "local only, no DP",
    "pretrained": "pretrained only (public data)",
    "finetune": "FedAvg fine-tuning, no DP",
}

#: Baseline lines of the plots: mode -> (colour, line style).
BASELINE_STYLES = {
    "none": ("black", "--"),
    "local": ("grey", ":"),
    "pretrained": ("tab:brown", "-."),
    "finetune": ("tab:olive", "--"),
}

#: A goal candidate's spent epsilon may exceed the target by at most this (accountant rounding).
_EPS_TOLERANCE = 1e-6


def goal_check(rows: Sequence[Mapping[str, Any]], profile: BenchProfile) -> dict[str, Any] | None:
    """The utility goal: does the best sample-level DP run at :data:`GOAL_EPSILON` of the
    benchmark's cohort (group ``dp``), audited PASS and having spent at most its target, keep
    at least ``profile.goal_fraction`` of the best non-private FedAvg Dice (``no-dp`` or
    ``no-dp-finetune``)? Returns ``met``, ``dp`` / ``reference`` (run name and Dice),
    ``fraction`` (their ratio) and ``required``; None when the rows hold no candidate or no
    reference (the goal is then not checked)."""
    reference = [r for r in rows if r["group"] == "baseline" and r["mode"] in ("none", "finetune")]
    dp = [
        r
        for r in rows
        if r["group"] == "dp"
        and r["level"] == "sample"
        and r["target_epsilon"] == GOAL_EPSILON
        and r["audit"] == "PASS"
        and r["spent_epsilon"] is not None
        and r["spent_epsilon"] <= GOAL_EPSILON + _EPS_TOLERANCE
    ]
    if not reference:
        return None
    candidates = [r for r in rows if r["group"] == "dp" and r["level"] == "sample"]
    if not any(r["target_epsilon"] == GOAL_EPSILON for r in candidates):
        return None
    ref = max(reference, key=lambda r: float(r["dice"]))
    best = max(dp, key=lambda r: float(r["dice"])) if dp else None
    ref_dice = float(ref["dice"])
    best_dice = float(best["dice"]) if best is not None else 0.0
    fraction = best_dice / ref_dice if ref_dice > 0 else 0.0
    return {
        "met": best is not None and ref_dice > 0 and fraction >= profile.goal_fraction,
        "dp": {"name": best["name"] if best else None, "dice": best_dice if best else None},
        "reference": {"name": ref["name"], "dice": ref_dice},
        "fraction": fraction,
        "required": profile.goal_fraction,
    }


def goal_line(goal: Mapping[str, Any] | None, profile: BenchProfile) -> str:
    """The summary.md line of :func:`goal_check`: met / not met with the two Dice figures."""
    head = (
        f"**Goal** (sample-level DP at ε {GOAL_EPSILON:g}, δ {profile.delta:g}, keeps ≥ "
        f"{profile.goal_fraction:.0%} of the non-private Dice): "
    )
    if goal is None:
        return head + "not checked (this profile has no sample-level run at ε 8 or no baseline)."
    ref = goal["reference"]
    if goal["dp"]["name"] is None:
        return (
            head + f"**NOT MET**: no sample-level run at ε {GOAL_EPSILON:g} passed its audit "
            f"within its target (non-private {ref['name']}: Dice {ref['dice']:.3f})."
        )
    verdict = "**MET**" if goal["met"] else "**NOT MET**"
    return (
        head + f"{verdict}: {goal['dp']['name']} Dice {goal['dp']['dice']:.3f} against the best "
        f"non-private run {ref['name']} Dice {ref['dice']:.3f} ({goal['fraction']:.1%})."
    )


def write_summary(
    rows: Sequence[Mapping[str, Any]], profile: BenchProfile, out: Path
) -> dict[str, Path]:
    """Write ``summary.json`` (the rows), ``summary.md`` (a table and what the plots show),
    ``dice_vs_epsilon.png`` and, when the profile has a cohort sweep, ``dice_vs_cohort.png``
    into ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "summary.json", "markdown": out / "summary.md"}
    paths["json"].write_text(json.dumps(list(rows), indent=2) + "\n")
    paths["markdown"].write_text(markdown(rows, profile))
    paths["epsilon_plot"] = out / "dice_vs_epsilon.png"
    plot_epsilon(rows, paths["epsilon_plot"])
    if any(r["group"] == "cohort" for r in rows):
        paths["cohort_plot"] = out / "dice_vs_cohort.png"
        plot_cohort(rows, paths["cohort_plot"])
    return paths


def _num(value: Any, fmt: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def markdown(rows: Sequence[Mapping[str, Any]], profile: BenchProfile) -> str:
    """The summary table: one line per run, with the empirical bound where it ran."""
    p = profile
    cases = "10, 8, 6, 12 (cycled)" if p.cases_per_site is None else str(p.cases_per_site)
    cohort = [r for r in rows if r["group"] == "cohort"]
    smallest = min((r["cases_per_site"] for r in cohort), default=None)
    pretrained = any(r.get("pretrained") for r in rows)
    lines = [
        f"# Privacy-utility benchmark (profile {p.name})",
        "",
        f"FedAvg through SecAgg+ on the synthetic federation: {p.sites} sites, cases per site "
        f"{cases}, volumes {list(p.shape)}, grid {list(p.grid)}, patch {list(p.patch)}, UNet "
        f"channels {list(p.channels)} ({p.res_units} residual unit(s), {p.norm} norm); "
        f"{p.rounds} rounds, {p.local_epochs} local epoch(s), lr {p.lr:g} ({p.lr_schedule}), "
        f"batch {p.batch_size}; delta {p.delta:g} ({p.accountant} accountant), per-patient clip "
        f"{p.sample_clip:g}, per-site clip {p.site_clip:g}. Dice: pooled over every site's "
        "held-out cases.",
        "",
        goal_line(goal_check(rows, p), p),
        "",
        "Spent epsilon: the largest any site spent, recomputed from the run's privacy ledger. "
        "Audit: `secure-fl audit` of the run folder. Empirical: the one-run lower bound on "
        "epsilon (Steinke et al. 2023, 95 % confidence) of the central site-level mechanism "
        "implementation with the run's clip, noise and rounds (it audits secure_fl's noise "
        "code on canaries, not the whole training pipeline).",
        "",
        (
            f"Pretrained: the UNet trained without DP on a public synthetic cohort of "
            f"{p.pretrain_cases} patients (institutions of its own, no private site read) for "
            f"{p.pretrain_epochs} epochs, once (`pretrained/`); *pretrained only* evaluates it "
            f"as it is, the fine-tuning runs train only {', '.join(p.trainable)} (the DP "
            "dimension d shrinks accordingly). Its seconds include the pretraining."
            if pretrained
            else "No pretrained lines in this profile."
        ),
        "",
        "| run | mode | cases/site | batch | target ε | spent ε | noise mult. | Dice | audit | "
        "empirical ε ≥ | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        emp = r.get("empirical")
        emp_text = "-"
        if emp:
            emp_text = _num(emp["lower_bound"]) + (" FLAGGED" if emp.get("flagged") else "")
        audit = str(r["audit"])
        audit = audit if audit in ("PASS", "NO DP") else "FAIL (findings below)"
        note = ""
        if r["group"] == "cohort" and r["cases_per_site"] == smallest and r["level"] != "none":
            note = "limit of the setting"
        lines.append(
            f"| {r['name']} | {MODE_LABELS.get(r['mode'], r['mode'])} | "
            f"{r['cases_per_site'] or 'default'} | {r.get('batch_size', '-')} | "
            f"{_num(r['target_epsilon'], 'g')} | {_num(r['spent_epsilon'])} | "
            f"{_num(r['noise_multiplier'])} | {r['dice']:.3f} | {audit} | {emp_text} | "
            f"{r['seconds']:.0f} | {note} |"
        )
    failed = [r for r in rows if r["audit"] not in ("PASS", "NO DP")]
    if failed:
        lines += ["", "Audit findings:"]
        lines += [f"- {r['name']}: {r['audit']}" for r in failed]
    stopped = [r for r in rows if r.get("stopped")]
    if stopped:
        lines += ["", "Runs stopped early by a privacy budget:"]
        lines += [f"- {r['name']}: {r['stopped']}" for r in stopped]
    if cohort:
        lines += [
            "",
            f"Cohort sweep: sample-level DP-SGD at epsilon {COHORT_EPSILON:g} with N cases per "
            f"site (batch min({p.batch_size}, N // 4)). The smallest cohort (N = {smallest}, "
            "note *limit of the setting*) is the limit: with so few patients per site the "
            "per-patient noise swamps the gradient signal of a model trained from scratch "
            "(signal-to-noise about epsilon * n / sqrt(2 d ln(1/delta))), and fine-tuning "
            "keeps little more than what the public pretraining gave.",
        ]
    lines += [
        "",
        "Plots: `dice_vs_epsilon.png` (Dice against target epsilon per DP mode; horizontal "
        "lines: the non-private, local-only and pretrained-only runs)"
        + (", `dice_vs_cohort.png` (Dice against cases per site at epsilon 8)." if cohort else "."),
    ]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_epsilon(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Dice against target epsilon (log scale) per DP mode, baselines as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    dp = [r for r in rows if r["group"] == "dp"]
    for mode in ("sample", "sample-ft", "site", "site-distributed"):
        pts = sorted((r["target_epsilon"], r["dice"]) for r in dp if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=MODE_LABELS[mode])
    for r in rows:
        if r["group"] == "baseline" and r["mode"] in BASELINE_STYLES:
            color, style = BASELINE_STYLES[r["mode"]]
            ax.axhline(r["dice"], color=color, linestyle=style, label=MODE_LABELS[r["mode"]])
    if dp:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("target epsilon (delta as in summary.md)")
    ax.set_ylabel("pooled held-out Dice")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("Privacy-utility: Dice against epsilon")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cohort(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Dice against cases per site: each cohort mode at epsilon 8 (and non-private when run),
    the smallest cohort marked as the limit, the default cohort's baselines as horizontal
    lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    cohort = [r for r in rows if r["group"] == "cohort"]
    for mode, label in (
        ("sample", f"sample-level DP-SGD, epsilon {COHORT_EPSILON:g}"),
        ("sample-ft", f"DP-SGD fine-tuning of the pretrained model, epsilon {COHORT_EPSILON:g}"),
        ("none", "FedAvg, no DP"),
    ):
        pts = sorted((r["cases_per_site"], r["dice"]) for r in cohort if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    if cohort:
        smallest = min(r["cases_per_site"] for r in cohort)
        ax.axvline(smallest, color="red", alpha=0.3, linewidth=6)
        ax.annotate("limit", (smallest, 0.95), color="red", ha="left", fontsize=8)
    for r in rows:
        if r["group"] == "baseline" and r["mode"] in BASELINE_STYLES:
            color, style = BASELINE_STYLES[r["mode"]]
            label = f"{MODE_LABELS[r['mode']]} (default cohort)"
            ax.axhline(r["dice"], color=color, linestyle=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cases per site")
    ax.set_ylabel("pooled held-out Dice")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"Dice against cohort size (epsilon {COHORT_EPSILON:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
