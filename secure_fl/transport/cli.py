"""Sub-commands ``secure-fl provision``, ``secure-fl server`` and ``secure-fl site``.

:func:`add_subcommands` adds them to the ``secure-fl`` parser; :func:`dispatch` runs a parsed
command. ``python -m secure_fl.transport.cli ...`` runs them on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from secure_fl.errors import SecureFLError

COMMANDS = ("provision", "server", "site")


def add_subcommands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``provision``, ``server`` and ``site`` to ``subparsers`` (each sets ``handler``)."""
    p = subparsers.add_parser(
        "provision",
        help="create a federation: CA, server and site certificates and keys, configs",
        description="Create FEDERATION_DIR with a certificate authority, a server certificate, "
        "one certificate and key per site, and a config for each party.",
    )
    p.add_argument("federation_dir", metavar="FEDERATION_DIR")
    p.add_argument(
        "--sites", default=None, help="comma-separated site names, e.g. a,b,c (required)"
    )
    p.add_argument(
        "--rotate-ckks",
        action="store_true",
        help="give the existing FEDERATION_DIR fresh CKKS keys: new artefacts for the server and "
        "every site, new fingerprints in every config (nothing else changes)",
    )
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
    p.add_argument(
        "--variant",
        choices=["active", "semi-honest"],
        default="active",
        help="SecAgg variant; each site's policy requires it (default: %(default)s)",
    )
    p.add_argument(
        "--corrupt-fraction",
        type=float,
        default=0.0,
        help="fraction of corrupt sites assumed by the server and every site's policy "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--dropout-rate",
        type=float,
        default=0.1,
        help="fraction of sites expected to drop out (default: %(default)s)",
    )
    p.add_argument("--federation", default=None, help="federation name (default: the dir name)")
    p.add_argument(
        "--ckks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write CKKS keys (default: when secure_fl.he and TenSEAL are installed)",
    )
    task = p.add_argument_group(
        "site task",
        "what each site computes: the synthetic test task, or the MONAI 3D-UNet trained on the "
        "site's own datalist (writes the task section of every site.json and the server's "
        "initial model)",
    )
    task.add_argument(
        "--task",
        choices=["synthetic", "unet"],
        default="synthetic",
        help="each site's task (default: %(default)s)",
    )
    task.add_argument(
        "--datalist-template",
        default=None,
        metavar="PATH",
        help="--task unet: each site's datalist path on its own machine, {site} replaced by the "
        "site's name, e.g. /data/{site}/datalist.json (a relative path is relative to the "
        "directory `secure-fl site` runs in)",
    )
    task.add_argument(
        "--site-datalist",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="--task unet: the datalist of one site (repeatable; wins over the template)",
    )
    task.add_argument(
        "--grid", default="48,48,48", help="--task unet: D,H,W (default: %(default)s)"
    )
    task.add_argument(
        "--patch",
        default="32,32,32",
        help="--task unet: training patch D,H,W (default: %(default)s)",
    )
    task.add_argument(
        "--channels",
        default="16,32,64,128",
        help="--task unet: UNet widths; 16,32,64,128 is 1.2 M parameters (default: %(default)s)",
    )
    task.add_argument("--lr", type=float, default=3e-3, help="--task unet (default: %(default)s)")
    task.add_argument(
        "--local-epochs", type=int, default=1, help="--task unet (default: %(default)s)"
    )
    from secure_fl.transport.provision_privacy import add_privacy_arguments

    add_privacy_arguments(p)
    p.set_defaults(handler=_provision)

    s = subparsers.add_parser("server", help="run the federation server")
    s.add_argument("config", metavar="CONFIG", help="the server's JSON config")
    add_log_format(s)
    s.set_defaults(handler=_server)

    t = subparsers.add_parser("site", help="run a site")
    t.add_argument("config", metavar="CONFIG", help="the site's JSON config")
    add_log_format(t)
    t.set_defaults(handler=_site)


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-format {auto,text,json}`` to ``parser`` (see :mod:`secure_fl.transport.logs`:
    ``auto`` is human-readable lines with ISO-8601 UTC times on a terminal, JSON lines
    otherwise; a log file is always JSON lines)."""
    parser.add_argument(
        "--log-format",
        choices=["auto", "text", "json"],
        default="auto",
        help="log lines on stderr: text (ISO-8601 UTC time, level, party, event, key=value), "
        "json (one object per line), or auto: text on a terminal, json otherwise; a log_file "
        "is always JSON lines (default: %(default)s)",
    )


def apply_log_format(args: argparse.Namespace) -> None:
    """Make ``args.log_format`` (when the command has the flag) the process's log format."""
    fmt = getattr(args, "log_format", None)
    if fmt is not None:
        from secure_fl.transport import logs

        logs.set_default_format(fmt)


def _provision(args: argparse.Namespace) -> int:
    from secure_fl.errors import ConfigError
    from secure_fl.transport.provision import provision, rotate_ckks
    from secure_fl.transport.provision_privacy import privacy_from_args

    if args.rotate_ckks:
        rotated = rotate_ckks(args.federation_dir)
        print(f"CKKS keys rotated in {args.federation_dir}: fingerprint {rotated.fingerprint}")
        if rotated.previous:
            print(f"  previous fingerprint {rotated.previous} (now refused everywhere)")
        for path in rotated.files:
            print(f"  wrote {path}")
        print(
            "copy server/ and sites/<name>/ to each machine again; a server checkpoint holding a "
            "CKKS-encrypted model under the old key cannot be resumed (use a fresh state_dir)"
        )
        return 0
    if not args.sites:
        raise ConfigError("--sites is required (unless --rotate-ckks)")
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    unet = _unet_task(args, sites)
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
        active=args.variant == "active",
        corrupt_fraction=args.corrupt_fraction,
        dropout_rate=args.dropout_rate,
        unet=unet,
        privacy=privacy_from_args(args),
    )
    print(f"federation provisioned in {done.root}")
    print(f"  server config: {done.server_config}")
    for name, path in done.site_configs.items():
        print(f"  site {name}: {path}")
    print(f"  CKKS keys: {done.ckks}")
    if unet is not None:
        print(f"  task: 3D-UNet, channels {list(unet.channels)}; initial model in server/")
        for name, path in unet.datalists.items():
            print(f"  site {name} reads its datalist {path}")
    print("keep ca/ca.key offline; copy server/ and sites/<name>/ to each machine")
    return 0


def _ints(option: str, text: str) -> tuple[int, ...]:
    from secure_fl.errors import ConfigError

    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from exc


def _unet_task(args: argparse.Namespace, sites: list[str]) -> Any:
    """The :class:`~secure_fl.transport.provision.UNetTask` of ``--task unet`` (else None).

    Errors: ConfigError for datalist options without ``--task unet`` or a bad option."""
    from secure_fl.errors import ConfigError
    from secure_fl.transport.provision import UNetTask, site_datalists

    if args.task != "unet":
        if args.datalist_template or args.site_datalist:
            raise ConfigError("--datalist-template / --site-datalist need --task unet")
        return None
    return UNetTask(
        datalists=site_datalists(
            sites, template=args.datalist_template, per_site=args.site_datalist
        ),
        grid=_ints("--grid", args.grid),
        patch=_ints("--patch", args.patch),
        channels=_ints("--channels", args.channels),
        lr=args.lr,
        local_epochs=args.local_epochs,
    )


def _server(args: argparse.Namespace) -> int:
    from secure_fl.transport.config import load_server_config
    from secure_fl.transport.server import run_server

    apply_log_format(args)
    return run_server(load_server_config(args.config))


def _site(args: argparse.Namespace) -> int:
    from secure_fl.transport.config import load_site_config
    from secure_fl.transport.site import (
        EXIT_FAIL_CLOSED,
        EXIT_NOT_TRAINED,
        EXIT_TLS,
        FAIL_CLOSED_MARKER,
        run_site,
    )

    apply_log_format(args)
    config = load_site_config(args.config)
    code = run_site(config)
    if code == EXIT_NOT_TRAINED:
        print(
            "error: the federation stopped after 0 rounds; no model was trained "
            "(no final model written)",
            file=sys.stderr,
        )
    elif code == EXIT_TLS:
        print(
            "error: TLS verification failed (CA mismatch between this site and the server; "
            "the reason is in the log's tls-verification-failed line)",
            file=sys.stderr,
        )
    elif code == EXIT_FAIL_CLOSED:
        print(
            "error: this site stopped for good after a check on a decrypted CKKS model failed "
            f"(see {config.state_dir / FAIL_CLOSED_MARKER} and the log); an operator must "
            "investigate and remove that file before the site takes part again",
            file=sys.stderr,
        )
    return code


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
