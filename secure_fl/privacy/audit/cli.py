"""The ``secure-fl audit RUN_DIR`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from secure_fl.errors import ConfigError
from secure_fl.privacy.audit.model import EXIT_STATUS, FAIL, NO_DP
from secure_fl.privacy.audit.report import _fmt
from secure_fl.privacy.audit.run import audit_run


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
    add_empirical_options(parser)
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
    status = EXIT_STATUS[result.status]
    if args.empirical:
        return _empirical(args, status)
    return status


def add_empirical_options(parser: argparse.ArgumentParser) -> None:
    """The ``--empirical`` flag and its options (shared with the ``secure-fl audit`` parser)."""
    from secure_fl.privacy import empirical

    parser.add_argument(
        "--empirical",
        action="store_true",
        help="also run the one-run empirical audit (Steinke et al. 2023) of the site-level "
        "central DP-FedAvg mechanism with the run's clip, noise and rounds: a lower bound on "
        "epsilon beside the accounted one; FAIL when it exceeds it",
    )
    parser.add_argument(
        "--canaries",
        type=int,
        default=empirical.DEFAULT_CANARIES,
        help=f"empirical: canary sites (default {empirical.DEFAULT_CANARIES})",
    )
    parser.add_argument(
        "--guesses",
        type=int,
        default=empirical.DEFAULT_GUESSES,
        help=f"empirical: guesses, even, <= canaries (default {empirical.DEFAULT_GUESSES})",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=empirical.DEFAULT_CONFIDENCE,
        help=f"empirical: confidence of the bound (default {empirical.DEFAULT_CONFIDENCE})",
    )


def _empirical(args: argparse.Namespace, status: int) -> int:
    """Run the empirical audit after the ledger audit; 1 when it flags the mechanism, 2 when
    the run's mechanism is not covered, else ``status`` (the ledger audit's exit status)."""
    import json

    from secure_fl.privacy.empirical import empirical_audit_run

    try:
        found = empirical_audit_run(
            args.run_dir,
            canaries=args.canaries,
            guesses=args.guesses,
            confidence=args.confidence,
        )
    except ConfigError as exc:
        print(f"error: empirical audit: {exc}", file=sys.stderr)
        return 2
    if not args.no_report:
        path = Path(args.run_dir) / "audit_empirical.json"
        path.write_text(json.dumps(found.to_dict(), indent=2) + "\n")
        print(f"empirical report: {path}")
    print(found.summary())
    if found.flagged:
        print("empirical audit: FAIL (lower bound above the accounted epsilon)")
        return EXIT_STATUS[FAIL]
    return status
