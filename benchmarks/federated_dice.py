"""Privacy-free utility benchmark: collaboration strategies and secure aggregation, by Dice.

Runs, on the synthetic federation and with one seed:

1. every strategy (centralised, FedAvg, FedProx, CWT, SWT, ensemble, local) with plain aggregation;
2. FedAvg through SecAgg+ and through SecAgg (same seed, same data);

and writes ``summary.md`` / ``summary.json`` with Dice per strategy, FedAvg as a fraction of the
centralised Dice, and the Dice cost of secure aggregation. Profiles: ``quick`` (2-core CPU, minutes)
and ``gpu`` (larger grid and model, more rounds).

Usage: ``.venv/bin/python benchmarks/federated_dice.py --profile quick --out runs/bench-quick``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from secure_fl.data import PreprocessConfig
from secure_fl.training import (
    STRATEGIES,
    AggregationConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    run_experiment,
)

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
    args = parser.parse_args()
    base = PROFILES[args.profile]
    if args.rounds:
        base = dataclasses.replace(base, rounds=args.rounds)
    if args.strategies:
        base = dataclasses.replace(base, strategies=tuple(args.strategies))
    out = Path(args.out or f"runs/bench-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)

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
