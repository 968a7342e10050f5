"""Sub-commands ``secure-fl provision``, ``secure-fl server`` and ``secure-fl site``.

:func:`add_subcommands` adds them to the ``secure-fl`` parser; :func:`dispatch` runs a parsed
command. ``python -m secure_fl.transport.cli ...`` runs them on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from secure_fl.errors import SecureFLError

COMMANDS = ("provision", "server", "site")


def add_subcommands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``provision``, ``server`` and ``site`` to ``subparsers`` (each sets ``handler``)."""
    p = subparsers.add_parser(
        "provision",
        help="create a federation: CA, server and site certificates and keys, configs",
        description="Create FEDERATION_DIR with a certificate authority, a server certificate, "
        "one certificate and key per site, and a config for each party.",
    )
    p.add_argument("federation_dir", metavar="FEDERATION_DIR")
    p.add_argument("--sites", required=True, help="comma-separated site names, e.g. a,b,c")
    p.add_argument("--listen", default="127.0.0.1:50051", help="server address (host:port)")
    p.add_argument(
        "--server-name",
        default="secure-fl-server",
        help="server certificate name (default: %(default)s)",
    )
    p.add_argument(
        "--server-host",
        action="append",
        default=None,
        help="extra DNS name or IP in the server certificate (repeatable; default localhost, "
        "127.0.0.1)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds to run (default: %(default)s)")
    p.add_argument(
        "--protocol",
        choices=["secagg", "secagg+", "plain", "ckks"],
        default="secagg+",
        help="aggregation (default: %(default)s)",
    )
    p.add_argument("--federation", default=None, help="federation name (default: the dir name)")
    p.add_argument(
        "--ckks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write CKKS keys (default: when secure_fl.he and TenSEAL are installed)",
    )
    p.set_defaults(handler=_provision)

    s = subparsers.add_parser("server", help="run the federation server")
    s.add_argument("config", metavar="CONFIG", help="the server's JSON config")
    s.set_defaults(handler=_server)

    t = subparsers.add_parser("site", help="run a site")
    t.add_argument("config", metavar="CONFIG", help="the site's JSON config")
    t.set_defaults(handler=_site)


def _provision(args: argparse.Namespace) -> int:
    from secure_fl.transport.provision import provision

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    done = provision(
        args.federation_dir,
        sites,
        federation=args.federation,
        listen=args.listen,
        server_name=args.server_name,
        server_hosts=tuple(args.server_host or ("localhost", "127.0.0.1")),
        rounds=args.rounds,
        protocol=args.protocol,
        ckks=args.ckks,
    )
    print(f"federation provisioned in {done.root}")
    print(f"  server config: {done.server_config}")
    for name, path in done.site_configs.items():
        print(f"  site {name}: {path}")
    print(f"  CKKS keys: {done.ckks}")
    print("keep ca/ca.key offline; copy server/ and sites/<name>/ to each machine")
    return 0


def _server(args: argparse.Namespace) -> int:
    from secure_fl.transport.config import load_server_config
    from secure_fl.transport.server import run_server

    return run_server(load_server_config(args.config))


def _site(args: argparse.Namespace) -> int:
    from secure_fl.transport.config import load_site_config
    from secure_fl.transport.site import run_site

    return run_site(load_site_config(args.config))


def dispatch(args: argparse.Namespace) -> int:
    """Run the command parsed by a parser set up with :func:`add_subcommands`.

    Returns the exit status: 0 on success, 2 on a configuration or other secure_fl error."""
    try:
        return int(args.handler(args))
    except SecureFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secure_fl.transport.cli")
    commands = parser.add_subparsers(dest="command", required=True)
    add_subcommands(commands)
    return dispatch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
