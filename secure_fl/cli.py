"""The ``secure-fl`` command.

Every error is one ``error: ...`` line on stderr with exit status 2 (usage and configuration
errors alike), never a traceback; ``--help`` of every command shows the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from secure_fl import __version__
from secure_fl.errors import SecureFLError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after every option that has a real default, unless its help
    already says it (a None or False default means "not given": nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == []
            or action.default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        if isinstance(action.default, list | tuple):
            return f"{text} (default: {' '.join(str(v) for v in action.default)})"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every secure-fl error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    from secure_fl.transport.cli import add_log_format

    parser = _Parser(
        prog="secure-fl",
        description="Privacy-preserving federated learning for medical imaging.",
    )
    parser.add_argument("--version", action="version", version=f"secure-fl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a 3D-UNet across 4 synthetic sites with SecAgg+, then with DP-SGD; Dice, epsilon",
        description="Train a 3D-UNet across 4 synthetic sites with SecAgg+, then with DP-SGD; "
        "print Dice and epsilon. Run it again to resume.",
    )
    demo.add_argument(
        "--rounds", type=_positive_int, default=None, help="federated rounds (default: 12)"
    )
    demo.add_argument("--run-dir", default="runs/demo", help="run folder")
    demo.add_argument("--data-dir", default="data/synthetic", help="synthetic data folder")
    demo.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    demo.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    add_log_format(demo)

    simulate = commands.add_parser(
        "simulate",
        help="run all sites of a federation on this machine from a TOML/YAML config",
        description="Run every strategy of an experiment configuration, all sites on this "
        "machine, into a run folder (config.json, metrics.jsonl, checkpoints, models, report). "
        "Running the same command again resumes after the last finished round; --rounds with "
        "more rounds than a finished run had extends it from its checkpoint.",
    )
    simulate.add_argument("config", help="experiment configuration (.toml, .yaml, .yml or .json)")
    add_log_format(simulate)
    simulate.add_argument(
        "--run-dir", default=None, help="run folder (default: runs/<the config's name>)"
    )
    simulate.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of rounds, replacing the config's rounds (default: the config's)",
    )
    simulate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a key of the configuration, dotted for tables (train.lr=0.01, "
        "aggregation.name=secagg+, preprocess.patch=[16,16,16]); the value is read as in a "
        "TOML file and checked as the config file is; repeatable",
    )
    simulate.add_argument(
        "--no-resume",
        action="store_true",
        help="start over in the run folder instead of resuming (the privacy ledger is kept)",
    )

    sdemo = commands.add_parser(
        "secagg-demo", help="secure aggregation demo: ten sites, one drops out, the exact sum"
    )
    sdemo.add_argument("--sites", type=int, default=10, help="number of sites (>= 3)")
    sdemo.add_argument(
        "--protocol", choices=["secagg", "secagg+"], default="secagg+", help="masking protocol"
    )
    sdemo.add_argument("--seed", type=int, default=0, help="seed for the synthetic updates")

    data = commands.add_parser("data", help="datasets: synthetic federation, BraTS datalists")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_cmds.add_parser(
        "synth",
        help="generate the synthetic multi-institution federation",
        description="Generate a synthetic multi-institution federation of T2-FLAIR-like volumes "
        "with tumour labels (deterministic: the same options give the same files) and its "
        "datalist. A folder that already holds the same federation is left as it is.",
    )
    synth.add_argument("out", help="output folder")
    synth.add_argument("--sites", type=int, default=4, help="number of sites (institutions)")
    synth.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(48, 48, 48),
        metavar=("D", "H", "W"),
        help="volume size in voxels (each side 16..256)",
    )
    synth.add_argument("--seed", type=int, default=0, help="seed of the generator (>= 0)")
    synth.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate a folder that holds another synthetic federation (deletes only the "
        "files its manifest lists)",
    )
    brats = data_cmds.add_parser(
        "brats", help="turn a BraTS-layout folder into a site-partitioned datalist"
    )
    brats.add_argument("root", help="folder with one sub-folder per case")
    brats.add_argument("--out", required=True, help="datalist JSON to write")
    brats.add_argument(
        "--sites",
        type=int,
        default=None,
        help="when case names carry no institution, spread cases over this many sites",
    )
    check = data_cmds.add_parser(
        "check",
        help="read every scan of a datalist; list each bad case (file: reason), exit 2 if any",
    )
    check.add_argument("datalist", help="datalist JSON")
    check.add_argument("--section", default="training", help="datalist section")
    check.add_argument(
        "--label-values",
        default="0,1,2,3,4",
        help="allowed label values, comma-separated, or 'any'",
    )
    check.add_argument("--no-brainmask", action="store_true", help="skip the brain-mask files")
    check.add_argument("--workers", type=_positive_int, default=1, help="reader threads")
    audit = commands.add_parser(
        "audit",
        help="verify a run's privacy ledger and recompute every site's epsilon "
        "(exit 0 PASS, 1 FAIL, 2 usage error, 3 NO DP: epsilon = infinity)",
    )
    audit.add_argument("run_dir", help="the run folder")
    audit.add_argument("--tolerance", type=float, default=1e-6, help="epsilon tolerance")
    audit.add_argument(
        "--datalist",
        default=None,
        help="datalist to re-derive q and steps from (default: the run's)",
    )
    from secure_fl.privacy.audit.cli import add_empirical_options

    add_empirical_options(audit)
    pre = commands.add_parser(
        "pretrain",
        help="pretrain a config's model on a public synthetic cohort (for model.pretrained)",
        description="Train the model of an experiment configuration without DP on a designated "
        "public synthetic cohort (its own institutions and patients, generated beside OUT; no "
        "private site is read) and write its weights to OUT, a checkpoint for model.pretrained "
        "(then fine-tune a subset under DP with train.trainable).",
    )
    pre.add_argument("config", help="experiment configuration (.toml, .yaml, .yml or .json)")
    pre.add_argument("out", help="checkpoint file to write (a torch state dict)")
    pre.add_argument(
        "--cases", type=_positive_int, default=32, help="cases of the public cohort (<= 10000)"
    )
    pre.add_argument("--epochs", type=_positive_int, default=20, help="training epochs (<= 10000)")
    pre.add_argument(
        "--public-dir",
        default=None,
        help="folder of the public cohort (default: public-cohort beside OUT)",
    )
    from secure_fl.bench.cli import add_bench_command

    add_bench_command(commands)
    from secure_fl.transport.cli import add_subcommands as add_transport_commands

    # provision, server, site (imports no grpc until run); their parsers are _Parser too
    add_transport_commands(cast("argparse._SubParsersAction[argparse.ArgumentParser]", commands))
    return parser


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from secure_fl.training import run_experiment
    from secure_fl.training.demo import DEMO_EPSILON, demo_config

    settings = [("secagg+", demo_config(data_dir=args.data_dir, rounds=args.rounds, dp=False))]
    if not args.no_dp:
        dp = demo_config(data_dir=args.data_dir, rounds=args.rounds, dp=True)
        settings.append(("secagg+-dp", dataclasses.replace(dp, name="demo-dp")))
    results = []
    for label, config in settings:
        print(f"\n== FedAvg through SecAgg+{' with DP-SGD' if 'dp' in label else ''} ==")
        summary = run_experiment(config, Path(args.run_dir) / label, resume=not args.no_resume)
        results.append((label, summary))
    print()
    for _, summary in results:
        print((Path(summary.run_dir) / "report.md").read_text())
    if len(results) == 2:
        plain, private = results[0][1].pooled["fedavg"], results[1][1].pooled["fedavg"]
        print(
            f"Privacy-utility: pooled Dice {plain:.3f} without DP, {private:.3f} with sample-level "
            f"DP-SGD at epsilon {DEMO_EPSILON:g} per site (delta 1e-5). With 6-12 patients per "
            "site, per-patient noise swamps the gradients of a 1.2 M-parameter network: "
            "DP learns when the trainable dimension shrinks: fine-tuning a publicly pretrained "
            "model's head and norm layers keeps 99.8 % of the non-private Dice at epsilon 8 "
            "(`secure-fl bench privacy-utility --profile quick`; README, Privacy against utility)."
        )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from secure_fl.training import load_config, run_experiment
    from secure_fl.training.config import parse_override

    overrides = [parse_override(text) for text in args.overrides]
    if args.rounds is not None:
        overrides.append(("rounds", args.rounds))
    config = load_config(args.config, overrides)
    run_dir = args.run_dir or f"runs/{config.name}"
    summary = run_experiment(config, run_dir, resume=not args.no_resume)
    if summary.stopped is not None:  # a planned end, not an error: models and report are written
        print(
            f"stopped by the privacy budget before round {summary.stopped.round}/"
            f"{config.rounds}; the models of "
            f"the last finished round and the report are in {run_dir}; "
            f"`secure-fl audit {run_dir}` explains the stop"
        )
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from secure_fl.training import load_config
    from secure_fl.training.pretrain import pretrain

    config = load_config(args.config)
    result = pretrain(
        config, args.out, public_dir=args.public_dir, cases=args.cases, epochs=args.epochs
    )
    print(
        f"pretrained on {result.cases} public cases ({result.datalist}), {result.epochs} epochs, "
        f"final loss {result.loss:.4f}, {result.seconds:.1f} s -> {result.checkpoint}\n"
        f'use it with model.pretrained = "{result.checkpoint}" and train.trainable'
    )
    return 0


def _data(args: argparse.Namespace) -> int:
    from secure_fl.data import generate_federation, scan_brats_folder, write_datalist

    if args.data_command == "check":
        return _data_check(args)
    if args.data_command == "synth":
        path = generate_federation(
            Path(args.out),
            sites=args.sites,
            shape=tuple(args.shape),
            seed=args.seed,
            overwrite=args.overwrite,
        )
        print(f"datalist: {path}")
        return 0
    cases = scan_brats_folder(Path(args.root), sites=args.sites)
    # BraTS 2023 names its FLAIR "-t2f" and uses labels 1-3; earlier releases use 1-4.
    scheme = (
        "brats2023" if any(c.image.name.split(".")[0].endswith("-t2f") for c in cases) else "brats"
    )
    write_datalist(cases, Path(args.out), extra={"label_scheme": scheme})
    per_site: dict[str, int] = {}
    for case in cases:
        per_site[case.site] = per_site.get(case.site, 0) + 1
    print(f"{len(cases)} cases from {len(per_site)} sites -> {args.out}")
    for site, count in sorted(per_site.items()):
        print(f"  {site}: {count}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from secure_fl.data import load_datalist
    from secure_fl.data.checks import check_cases, parse_label_values

    cases = load_datalist(args.datalist, section=args.section, must_exist=False)
    report = check_cases(
        cases,
        label_values=parse_label_values(args.label_values),
        check_brainmask=not args.no_brainmask,
        workers=args.workers,
    )
    if report.ok:
        print(f"{report.summary()} ({report.seconds:.2f} s)")
        return 0
    for line in report.lines():
        print(f"error: {line}", file=sys.stderr)
    print(f"{report.summary()} ({report.seconds:.2f} s)")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the process exit status: 0 on success, 2 on a usage, configuration
    or file error (one ``error: ...`` line on stderr), 130 when interrupted (resumable); the
    audit adds 1 (FAIL) and 3 (NO DP)."""
    # Idle OpenMP threads sleep instead of spinning: under CPU contention (several site processes
    # on one machine) spinning made rounds 2-7x slower. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if args.command in ("demo", "simulate"):  # library warnings in the chosen log format
            from secure_fl.transport import logs

            logs.setup(args.command, level=logging.WARNING, fmt=args.log_format)
        if args.command == "secagg-demo":
            from secure_fl.demo import run_demo

            if args.sites < 3:
                print("error: --sites must be >= 3", file=sys.stderr)
                return 2
            return 0 if run_demo(sites=args.sites, protocol=args.protocol, seed=args.seed) else 1
        if args.command == "demo":
            return _demo(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "data":
            return _data(args)
        if args.command == "audit":
            from secure_fl.privacy.audit import main as audit_main

            extra = ["--datalist", args.datalist] if args.datalist else []
            if args.empirical:
                extra += ["--empirical", "--canaries", str(args.canaries)]
                extra += ["--guesses", str(args.guesses), "--confidence", str(args.confidence)]
            return audit_main([args.run_dir, "--tolerance", str(args.tolerance), *extra])
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "bench":
            from secure_fl.bench.cli import run_bench_command

            return run_bench_command(args)
        if args.command in ("provision", "server", "site"):
            return int(args.handler(args))
    except SecureFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the user named: unreadable, unwritable, missing
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
