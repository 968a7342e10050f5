"""The ``secure-fl bench`` verb: ``secure-fl bench privacy-utility --profile quick --out DIR``."""

from __future__ import annotations

import argparse
from typing import Any

from secure_fl.bench.profiles import PROFILES


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def add_bench_command(commands: Any) -> None:
    """Register ``bench`` (with its ``privacy-utility`` sub-command) on the ``secure-fl``
    sub-parsers ``commands``."""
    bench = commands.add_parser("bench", help="benchmarks: privacy-utility (Dice against epsilon)")
    verbs = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    pu = verbs.add_parser(
        "privacy-utility",
        help="Dice against epsilon per DP mode, baselines, cohort sweep; audited; plots",
        description="Pretrain the model once on a public synthetic cohort, then run FedAvg "
        "through SecAgg+ on the synthetic federation without DP, local-only, pretrained-only, "
        "fine-tuning the pretrained model, and with sample-level DP-SGD (from scratch and as "
        "fine-tuning of the pretrained model) and site-level DP-FedAvg at several target "
        "epsilons, plus a cohort-size sweep at epsilon 8; audit every DP run; write "
        "summary.json, summary.md (with the goal: DP at epsilon 8 keeps >= 90 percent of the "
        "non-private Dice, met or not) and PNG plots into --out. The same command again resumes "
        "(finished runs are read back); after changing the profile, the options or the code, "
        "use a new --out (a run folder refuses another configuration, and a DP run's ledger is "
        "never reset).",
    )
    pu.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="quick",
        help="grid size: smoke (tests, seconds), quick (2-core CPU, < 20 min), full",
    )
    pu.add_argument("--out", default="runs/privacy-utility", help="output folder")
    pu.add_argument(
        "--rounds", type=_int_at_least(1), default=None, help="rounds (default: the profile's)"
    )
    pu.add_argument(
        "--epsilons",
        type=_positive_float,
        nargs="+",
        default=None,
        metavar="EPS",
        help="target epsilons of the DP runs (default: the profile's)",
    )
    pu.add_argument(
        "--cohorts",
        type=_int_at_least(0),
        nargs="+",
        default=None,
        metavar="N",
        help="cases per site of the cohort sweep at epsilon 8; 0 for none (default: the profile's)",
    )


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the parsed ``bench`` command; 0 on success (errors propagate as SecureFLError)."""
    from secure_fl.bench.privacy_utility import run_benchmark
    from secure_fl.bench.profiles import get_profile

    cohorts = None
    if args.cohorts is not None:
        cohorts = [n for n in args.cohorts if n != 0]
    profile = get_profile(args.profile, rounds=args.rounds, epsilons=args.epsilons, cohorts=cohorts)
    run_benchmark(profile, args.out)
    print(f"summary: {args.out}/summary.md  {args.out}/summary.json")
    return 0
