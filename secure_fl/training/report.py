"""The run report: a markdown table of Dice per site and pooled for each strategy, and a PNG of
Dice by round (pooled, and per site)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from secure_fl.training.config import ExperimentConfig


def write_report(
    run: Path,
    config: ExperimentConfig,
    rows: Sequence[dict[str, Any]],
    *,
    stopped: Mapping[str, Any] | None = None,
) -> None:
    """Write ``report.md`` and ``dice_vs_rounds.png`` into ``run`` from the metrics rows: the
    final Dice of each strategy per site and pooled over all held-out cases, and the plot of both
    against rounds (:func:`dice_figure`).

        ``stopped`` (the run's ``stopped.json``) adds a paragraph saying which round a privacy budget
        refused and why. Under DP the report says what the Dice covers (held-out patients are outside
        the guarantee) and carries no training loss.
    """
    final: dict[str, dict[str, Any]] = {}
    for row in rows:
        final[row["strategy"]] = row  # rows are in round order
    sites = sorted({s for r in final.values() for s in r["dice"]})
    lines = [
        f"# {config.name}",
        "",
        f"{len(sites)} sites, {config.rounds} rounds, seed {config.seed}, aggregation "
        f"`{config.aggregation.name}` (for fedavg/fedprox), model channels "
        f"{list(config.model.channels)}, grid {list(config.preprocess.grid)}.",
        "",
        f"Dice ({config.data.target.replace('_', ' ')}) on each site's held-out cases after the "
        "last round (-: none, e.g. a site with one case, which trains without validation):",
        "",
        "| strategy | " + " | ".join(sites) + " | pooled |",
        "|---|" + "---|" * (len(sites) + 1),
    ]
    for name in config.strategies:
        if name not in final:
            continue
        row = final[name]
        cells = [_fmt(row["dice"].get(s)) for s in sites] + [_fmt(row["pooled_dice"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    private = [r for r in rows if r.get("privacy")]
    if private:
        last_p = private[-1]["privacy"]
        eps = ", ".join(f"{site} {value:.2f}" for site, value in sorted(last_p["epsilon"].items()))
        lines += [
            "",
            f"Differential privacy ({last_p['level']} level, {last_p['accountant']} accountant): "
            f"epsilon spent at delta={last_p['delta']:g}: {eps}. The ledger is "
            "`privacy_ledger.sqlite`; verify it with `secure-fl audit RUN_DIR`. The Dice above "
            "is that of the released (DP) model on each site's held-out cases: post-processing "
            "for the training patients, but the held-out patients are outside the guarantee.",
        ]
    if stopped:
        lines += [
            "",
            f"**Stopped by the privacy budget** before {stopped.get('strategy')} round "
            f"{stopped.get('round')}/{config.rounds}: {stopped.get('message')}. The models are "
            "those of the last finished round.",
        ]
    agg = [r for r in rows if r.get("aggregation")]
    if agg:
        last = agg[-1]["aggregation"]
        lines += [
            "",
            f"Aggregation ({last.get('aggregator')}): threshold {_dash(last.get('threshold'))}, "
            f"k {_dash(last.get('k'))}, {_dash(last.get('bits'))}-bit, values clipped "
            f"{last.get('clipped_total') or 0}, max quantisation error "
            f"{last.get('max_error') or 0:.2e}.",
        ]
    server_opt = config.strategy.server_optimizer
    if server_opt.get("name", "fedavg") != "fedavg" or server_opt.get("lr", 1.0) != 1.0:
        options = ", ".join(f"{k} {v:g}" for k, v in server_opt.items() if k != "name")
        lines += ["", f"Server optimiser (fedavg/fedprox): {server_opt['name']} ({options})."]
    from secure_fl.training.final_eval import evaluation_markdown

    lines += evaluation_markdown(run)  # final validation and test set, Dice and HD95
    lines += [
        "",
        "![Dice against rounds: pooled (left) and per site (right)](dice_vs_rounds.png)",
        "",
    ]
    (run / "report.md").write_text("\n".join(lines))
    _plot(run / "dice_vs_rounds.png", config, rows)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


_SITE_STYLES: tuple[tuple[Any, str], ...] = (
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (5, 1, 1, 1)), "v"),
)


def dice_figure(config: ExperimentConfig, rows: Sequence[dict[str, Any]]) -> Any:
    """The matplotlib figure of Dice against rounds (numbered from 1, as in metrics.jsonl):
    pooled Dice, one line per strategy; and, when the rows hold per-site Dice, a second panel
    with one line per (strategy, site) - the strategy's colour, one line style per site. Integer
    round ticks; each legend outside its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    sites = sorted({s for r in rows for s in (r.get("dice") or {})})
    if sites:
        fig, (ax, ax_sites) = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax_sites = None
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    plotted = False
    for i, name in enumerate(config.strategies):
        mine = [r for r in rows if r["strategy"] == name]
        if not mine:
            continue
        colour = colours[i % len(colours)]
        xs = [r["round"] for r in mine]
        ax.plot(xs, [_num(r["pooled_dice"]) for r in mine], marker="o", label=name, color=colour)
        plotted = True
        if ax_sites is not None:
            for j, site in enumerate(sites):
                style, marker = _SITE_STYLES[j % len(_SITE_STYLES)]
                ys = [_num((r.get("dice") or {}).get(site)) for r in mine]
                ax_sites.plot(xs, ys, color=colour, linestyle=style, marker=marker, markersize=4)
    axes = [(ax, "pooled Dice (held-out cases)")]
    if ax_sites is not None:
        axes.append((ax_sites, "Dice per site (held-out cases)"))
    for a, ylabel in axes:
        a.set_xlabel("round")
        a.set_ylabel(ylabel)
        a.set_ylim(0, 1)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    if plotted:  # beside the axes: a legend inside would hide the lines it names
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        if ax_sites is not None:
            handles = [
                Line2D([], [], color="black", linestyle=style, marker=marker, markersize=4)
                for style, marker in (
                    _SITE_STYLES[j % len(_SITE_STYLES)] for j in range(len(sites))
                )
            ]
            ax_sites.legend(
                handles, sites, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0
            )
    ax.set_title(config.name)
    if ax_sites is not None:
        ax_sites.set_title("per site (colour: strategy)")
    fig.tight_layout()
    return fig


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _plot(path: Path, config: ExperimentConfig, rows: Sequence[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig = dice_figure(config, rows)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
