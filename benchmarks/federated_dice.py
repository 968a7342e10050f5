"""Privacy-free utility benchmark: collaboration strategies and secure aggregation, by Dice.

Runs, on the synthetic federation and with one seed:

1. every strategy (centralised, FedAvg, FedProx, CWT, SWT, ensemble, local) with plain aggregation;
2. FedAvg through SecAgg+ and through SecAgg (same seed, same data);

and writes ``summary.md`` / ``summary.json`` with Dice per strategy, FedAvg as a fraction of the
centralised Dice, and the Dice cost of secure aggregation. Profiles: ``quick`` (2-core CPU, minutes)
and ``gpu`` (larger grid and model, more rounds).

``--variants NAME ...`` instead compares named FedAvg settings (:data:`VARIANTS`: local epochs,
server momentum / FedAdam, a server learning rate) against the centralised baseline trained with the
same local settings, and writes ``variants.md`` / ``variants.json``: setting, federated Dice,
centralised Dice, ratio, rounds and the command that reproduces the row. A variant that changes only
``strategy.*`` (the server's step) shares the centralised run of the profile's own settings.

Usage: ``.venv/bin/python benchmarks/federated_dice.py --profile quick --out runs/bench-quick``
and ``.venv/bin/python benchmarks/federated_dice.py --variants fedavg fedavgm --out runs/v``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fl.data import PreprocessConfig
from secure_fl.errors import ConfigError
from secure_fl.training import (
    STRATEGIES,
    AggregationConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    run_experiment,
)
from secure_fl.training.config import apply_overrides, config_from_mapping

PROFILES = {
    "quick": ExperimentConfig(
        name="bench-quick",
        rounds=30,
        strategies=STRATEGIES,
        data=DataConfig(synthetic_dir="data/synthetic", synthetic_sites=4),
        preprocess=PreprocessConfig(grid=(48, 48, 48), patch=(32, 32, 32)),
        model=ModelConfig(channels=(16, 32, 64, 128)),
        train=TrainConfig(lr=3e-3, local_epochs=2, batch_size=2),
    ),
    "gpu": ExperimentConfig(
        name="bench-gpu",
        rounds=40,
        strategies=STRATEGIES,
        data=DataConfig(
            synthetic_dir="data/synthetic-96", synthetic_sites=6, synthetic_shape=(96, 96, 96)
        ),
        preprocess=PreprocessConfig(grid=(96, 96, 96), patch=(64, 64, 64), samples_per_volume=4),
        model=ModelConfig(channels=(16, 32, 64, 128, 256)),
        train=TrainConfig(lr=1e-3, local_epochs=2, batch_size=4),
    ),
}

#: Named FedAvg settings for ``--variants``: (dotted config key, value) pairs applied to the
#: profile exactly as ``secure-fl simulate --set`` would. ``fedavgm`` (server momentum 0.5, Hsu et
#: al. 2019) is the setting of ``configs/fedavg_momentum.toml``, the best measured (issue 13):
#: at 30 rounds FedAvg's sites take 2-5 Adam steps per epoch against the pooled model's 14, and
#: the late, low-learning-rate rounds of the cosine schedule leave FedAvg behind; the momentum
#: carries the averaged update further in each round.
VARIANTS: dict[str, tuple[tuple[str, Any], ...]] = {
    "fedavg": (),
    "fedavgm": (("strategy.server_optimizer", {"name": "fedavgm", "lr": 1.0, "momentum": 0.5}),),
    "fedavgm-0.7": (
        ("strategy.server_optimizer", {"name": "fedavgm", "lr": 1.0, "momentum": 0.7}),
    ),
    "fedadam": (("strategy.server_optimizer", {"name": "fedadam", "lr": 0.01}),),
    "server-lr-2": (("strategy.server_optimizer", {"name": "fedavg", "lr": 2.0}),),
    "epochs-4": (("train.local_epochs", 4),),
    "fedavgm-epochs-4": (
        ("train.local_epochs", 4),
        ("strategy.server_optimizer", {"name": "fedavgm", "lr": 1.0, "momentum": 0.5}),
    ),
}


@dataclass(frozen=True)
class VariantRow:
    """One row of the variant comparison: the pooled Dice of FedAvg under ``setting`` and of the
    centralised baseline trained with the same local settings, after ``rounds`` rounds."""

    setting: str
    federated: float
    centralised: float
    rounds: int
    command: str

    @property
    def ratio(self) -> float:
        """Federated Dice as a fraction of the centralised Dice."""
        return self.federated / self.centralised


def variant_config(base: ExperimentConfig, name: str) -> ExperimentConfig:
    """``base`` with the overrides of ``VARIANTS[name]``, validated as a config file would be.

    Errors: ConfigError naming ``--variants`` for an unknown name, or the key of a bad override.
    """
    if name not in VARIANTS:
        raise ConfigError(f"--variants: {name!r} is not one of {sorted(VARIANTS)}")
    return config_from_mapping(apply_overrides(base.to_dict(), VARIANTS[name]))


def _local_key(name: str) -> tuple[tuple[str, str], ...]:
    """The overrides of ``name`` that change local training (all but the server's step): the
    variants sharing this key share one centralised run."""
    return tuple((k, repr(v)) for k, v in VARIANTS[name] if not k.startswith("strategy."))


def compare_variants(
    base: ExperimentConfig, names: Sequence[str], out: Path, command: str
) -> list[VariantRow]:
    """Run FedAvg under every variant of ``names`` and the centralised baseline once per distinct
    local setting (plain aggregation), under ``out``; ``command`` is the row's command prefix.
    Errors: ConfigError for an unknown variant (before anything runs)."""
    configs = {name: variant_config(base, name) for name in names}
    central: dict[tuple[tuple[str, str], ...], float] = {}
    rows = []
    for name, config in configs.items():
        key = _local_key(name)
        plain = dataclasses.replace(config, aggregation=AggregationConfig(name="plain"))
        strategies = ("fedavg",) if key in central else ("centralized", "fedavg")
        summary = run_experiment(
            dataclasses.replace(plain, name=f"{base.name}-{name}", strategies=strategies),
            out / name,
        )
        central.setdefault(key, summary.pooled.get("centralized", float("nan")))
        rows.append(
            VariantRow(
                name,
                summary.pooled["fedavg"],
                central[key],
                config.rounds,
                f"{command} --variants {name}",
            )
        )
    return rows


def variants_table(rows: Sequence[VariantRow]) -> list[str]:
    """The markdown table of :func:`compare_variants`' rows."""
    lines = [
        "| setting | federated Dice | centralised Dice | ratio | rounds | command |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | {r.federated:.4f} | {r.centralised:.4f} | {r.ratio:.4f} | "
            f"{r.rounds} | `{r.command}` |"
        )
    return lines


def _run_variants(base: ExperimentConfig, args: argparse.Namespace, out: Path) -> None:
    command = f"benchmarks/federated_dice.py --profile {args.profile} --rounds {base.rounds}"
    if args.seed is not None:
        command += f" --seed {args.seed}"
    rows = compare_variants(base, args.variants, out, command)
    lines = [
        f"# FedAvg settings against the centralised Dice, profile `{args.profile}`",
        "",
        f"seed {base.seed}, plain aggregation; pooled Dice over every site's held-out cases "
        "(target ratio >= 0.99).",
        "",
        *variants_table(rows),
    ]
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    payload = [{**dataclasses.asdict(r), "ratio": r.ratio} for r in rows]
    (out / "variants.json").write_text(json.dumps(payload, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", default=None, help="output folder (default runs/bench-<profile>)")
    parser.add_argument("--rounds", type=int, default=None, help="override the profile's rounds")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="a subset of the strategies (must include centralized and fedavg)",
    )
    parser.add_argument(
        "--secure", nargs="*", default=["secagg+", "secagg"], help="aggregators to compare"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=sorted(VARIANTS),
        help="compare these FedAvg settings with the centralised Dice instead (variants.md)",
    )
    parser.add_argument("--seed", type=int, default=None, help="override the profile's seed")
    args = parser.parse_args()
    base = PROFILES[args.profile]
    if args.rounds:
        base = dataclasses.replace(base, rounds=args.rounds)
    if args.seed is not None:
        base = dataclasses.replace(base, seed=args.seed)
    if args.strategies:
        base = dataclasses.replace(base, strategies=tuple(args.strategies))
    out = Path(args.out or f"runs/bench-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)
    if args.variants:
        _run_variants(base, args, out)
        return

    results: dict[str, float] = {}
    per_site: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    summary = run_experiment(base, out / "strategies")
    timings["strategies"] = time.perf_counter() - start
    results.update(summary.pooled)
    per_site.update(summary.dice)
    for agg in args.secure:
        config = dataclasses.replace(
            base,
            name=f"{base.name}-{agg}",
            strategies=("fedavg",),
            aggregation=AggregationConfig(name=agg, options={"dropout_rate": 0.1}),
        )
        start = time.perf_counter()
        secure = run_experiment(config, out / f"fedavg-{agg}")
        timings[f"fedavg-{agg}"] = time.perf_counter() - start
        results[f"fedavg ({agg})"] = secure.pooled["fedavg"]
        per_site[f"fedavg ({agg})"] = secure.dice["fedavg"]

    central = results["centralized"]
    fedavg = results["fedavg"]
    lines = [
        f"# Federated Dice benchmark, profile `{args.profile}`",
        "",
        f"{base.rounds} rounds, seed {base.seed}, grid {list(base.preprocess.grid)}, "
        f"channels {list(base.model.channels)}; pooled Dice over every site's held-out cases.",
        "",
        "| strategy | pooled Dice | / centralised |",
        "|---|---|---|",
    ]
    for name, value in sorted(results.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {value:.4f} | {value / central:.3f} |")
    secure_cost = {k: fedavg - v for k, v in results.items() if k.startswith("fedavg (")}
    lines += [
        "",
        f"FedAvg / centralised: {fedavg / central:.4f} (target >= 0.99)",
        *(f"Dice cost of {k}: {v:+.4f} (target within 0.005)" for k, v in secure_cost.items()),
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(
        json.dumps({"pooled": results, "per_site": per_site, "seconds": timings}, indent=2)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
