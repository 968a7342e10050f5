"""The simulated run's report and plot carry pooled and per-site Dice."""

from __future__ import annotations

from pathlib import Path

from training_helpers import tiny_config

from secure_fl.training.config import StrategyConfig
from secure_fl.training.report import dice_figure, write_report


def _rows() -> list[dict]:
    return [
        {
            "strategy": s,
            "round": r,
            "pooled_dice": base + 0.1 * r,
            "dice": {"site-A": base + 0.05 * r, "site-B": base + 0.15 * r},
        }
        for s, base in (("fedavg", 0.5), ("local", 0.2))
        for r in (1, 2, 3)
    ]


def test_the_plot_has_a_pooled_and_a_per_site_panel(tiny_datalist: Path) -> None:
    import matplotlib.pyplot as plt

    config = tiny_config(tiny_datalist, rounds=3, strategies=("fedavg", "local"))
    fig = dice_figure(config, _rows())
    try:
        fig.canvas.draw()
        pooled, per_site = fig.axes
        assert len(pooled.get_lines()) == 2  # one per strategy
        assert len(per_site.get_lines()) == 4  # one per (strategy, site)
        for line in per_site.get_lines():
            assert list(line.get_xdata()) == [1, 2, 3]
        # colour = strategy in both panels
        colours = {ln.get_label(): ln.get_color() for ln in pooled.get_lines()}
        site_colours = [ln.get_color() for ln in per_site.get_lines()]
        assert site_colours == [colours["fedavg"]] * 2 + [colours["local"]] * 2
        legend = per_site.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["site-A", "site-B"]
        renderer = fig.canvas.get_renderer()
        for ax in (pooled, per_site):  # legends beside, not over, the lines
            box = ax.get_legend().get_window_extent(renderer)
            assert not box.overlaps(ax.get_window_extent(renderer))
    finally:
        plt.close(fig)


def test_the_report_table_has_every_site_and_pooled(tiny_datalist: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_datalist,
        rounds=3,
        strategies=("fedavg", "local"),
        strategy=StrategyConfig({"name": "fedavgm", "momentum": 0.5}),
    )
    write_report(tmp_path, config, _rows())
    text = (tmp_path / "report.md").read_text()
    assert "| strategy | site-A | site-B | pooled |" in text
    assert "| fedavg | 0.650 | 0.950 | 0.800 |" in text
    assert "Server optimiser (fedavg/fedprox): fedavgm (lr 1, momentum 0.5)." in text
    assert (tmp_path / "dice_vs_rounds.png").stat().st_size > 1000
