"""The run report: a markdown table of Dice per site and strategy, and a PNG of Dice by round."""

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
    """Write ``report.md`` and ``dice_vs_rounds.png`` into ``run`` from the metrics rows.

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
        "Dice (whole tumour) on each site's held-out cases after the last round:",
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
    lines += ["", "![Dice against rounds](dice_vs_rounds.png)", ""]
    (run / "report.md").write_text("\n".join(lines))
    _plot(run / "dice_vs_rounds.png", config, rows)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def dice_figure(config: ExperimentConfig, rows: Sequence[dict[str, Any]]) -> Any:
    """The matplotlib figure of pooled Dice against rounds (numbered from 1, as in
    metrics.jsonl), one line per strategy, integer round ticks, the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    plotted = False
    for name in config.strategies:
        points = [(r["round"], r["pooled_dice"]) for r in rows if r["strategy"] == name]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=name)
            plotted = True
    ax.set_xlabel("round")
    ax.set_ylabel("pooled Dice (held-out cases)")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if plotted:  # beside the axes: a legend inside would hide the lines it names
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.set_title(config.name)
    fig.tight_layout()
    return fig


def _plot(path: Path, config: ExperimentConfig, rows: Sequence[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig = dice_figure(config, rows)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
