"""The ``secure-fl`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from secure_fl import __version__
from secure_fl.errors import SecureFLError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secure-fl",
        description="Privacy-preserving federated learning for medical imaging.",
    )
    parser.add_argument("--version", action="version", version=f"secure-fl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="secure aggregation demo: ten sites, one drops out, the exact sum"
    )
    demo.add_argument("--sites", type=int, default=10, help="number of sites (>= 3, default 10)")
    demo.add_argument(
        "--protocol", choices=["secagg", "secagg+"], default="secagg+", help="masking protocol"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for the synthetic updates")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the process exit status (0 on success)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from secure_fl.demo import run_demo

            if args.sites < 3:
                print("error: --sites must be >= 3", file=sys.stderr)
                return 2
            return 0 if run_demo(sites=args.sites, protocol=args.protocol, seed=args.seed) else 1
    except SecureFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
