"""How secure_fl's SecAgg+ scales: a 100-site Flower simulation and per-site cost up to 1000 sites.

Run (both parts): ``.venv/bin/python benchmarks/flower_scale.py --out scale.json``; options
``--part ray|sites|both``, ``--ray-sites 100``, ``--length 1200000`` (part a),
``--warmup 1`` (part a), ``--sizes 50,100,200,500,1000``, ``--small-length 1000`` and
``--max-complete N`` (part b: no SecAgg above N sites), ``--protocols secagg+,secagg``, ``--active``.
Measured (commit-time figures in the helper report): ``--part sites --max-complete 500`` takes
about 4 minutes on 2 shared cores (SecAgg at 500 sites alone ~2 minutes), ``--part ray`` about 2.

(a) **Flower simulation** (``run_simulation``, Ray backend, 2 actors by default): ``--ray-sites``
    virtual SuperNodes run ``--warmup`` secure_fl SecAgg+ rounds (Ray start-up), then the measured
    one, on a ``--length``-value float32 update (``flower_side_by_side.run_ours``:
    ``SecureAggregationWorkflow`` + the site mod). Measured: the round wall, the server's compute (wall minus time in the Grid), per-site seconds and bytes,
    the server process's peak RSS (``ru_maxrss``) and each Ray ``ClientAppActor`` process's peak
    RSS (``VmHWM`` sampled from ``/proc``); peaks cover every round of the run.
(b) **Per-site cost against n**: one round per ``n`` in ``--sizes`` with ``--small-length`` values,
    SecAgg+ (sparse graph, degree k ~ log n) against SecAgg (complete graph, k = n - 1), run by the
    round layer's in-process driver :func:`secure_fl.rounds.run_local` -- the same round objects
    the Flower mod hosts, without Ray: 1000 virtual Ray nodes on 2 cores would measure Ray's
    scheduling, not the protocol. Per site: seconds of site compute (mean), bytes it sends (mean),
    bytes the server sends it (server total / n); the server's seconds. Semi-honest variant unless
    ``--active`` (then every site signs; keys generated here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_common import (
    DROPOUT_RATE,
    ProcessMemory,
    markdown_table,
    mean,
    peak_rss_mib,
    quiet_flower,
    write_json,
)


def per_site_cost(n: int, length: int, protocol: str, *, active: bool = False) -> dict[str, Any]:
    """One ``protocol`` round among ``n`` in-process sites on ``length`` values (nobody drops):
    the figures of part (b). Errors: ConfigError from the plan (e.g. n < 3)."""
    from secure_fl.rounds import AggregationSpec, plan_round, run_local

    spec = AggregationSpec(protocol=protocol, active=active, dropout_rate=DROPOUT_RATE)
    keys = None
    verify = None
    if active:
        from secure_fl.crypto import SigningKey

        keys = {i: SigningKey.generate() for i in range(1, n + 1)}
        verify = {i: k.public_bytes for i, k in keys.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan warns about its failure probability
        plan = plan_round(
            spec,
            dict.fromkeys(range(1, n + 1), 1.0),
            vector_length=length,
            round_id=1 + n,
            verify_keys=verify,
        )
    rng = np.random.default_rng(n)
    updates = {i: rng.uniform(-1, 1, length) for i in plan.ids}
    t0 = time.perf_counter()
    outcome = run_local(plan, updates, signing_keys=keys)
    wall = time.perf_counter() - t0
    record = outcome.record
    if outcome.mean is None:  # pragma: no cover - masked rounds release a mean
        raise RuntimeError("the round released no mean")
    error = float(np.max(np.abs(outcome.mean - np.mean(list(updates.values()), axis=0))))
    secagg = plan.secagg
    return {
        "n": n,
        "protocol": protocol,
        "active": active,
        "k": None if secagg is None else secagg.k,
        "threshold": None if secagg is None else secagg.threshold,
        "site_seconds_mean": mean(record["site_seconds"].values()),
        "site_bytes_sent_mean": mean(record["bytes_sent"].values()),
        "site_bytes_received_mean": record["server_bytes_sent"] / n,
        "server_seconds": float(record["server_seconds"]),
        "round_wall_s": wall,
        "survivors": len(outcome.survivors),
        "max_abs_error": error,
    }


def part_sites(
    sizes: Sequence[int],
    length: int,
    protocols: Sequence[str],
    *,
    active: bool,
    max_complete: int | None = None,
    progress: Path | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Part (b): one row per (n, protocol); the rows and their markdown table. SecAgg (complete
    graph) is skipped above ``max_complete`` sites (its in-process round costs ~n^2); each row
    is appended to ``progress`` (JSON lines) as soon as it is measured."""
    rows = []
    for n in sizes:
        for protocol in protocols:
            if protocol == "secagg" and max_complete is not None and n > max_complete:
                continue
            row = per_site_cost(n, length, protocol, active=active)
            rows.append(row)
            if progress is not None:
                with progress.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
            print(
                f"  n={n} {protocol}: site {row['site_seconds_mean'] * 1e3:.1f} ms, "
                f"sent {row['site_bytes_sent_mean']:.0f} B, wall {row['round_wall_s']:.1f} s",
                flush=True,
            )
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_n.setdefault(row["n"], {})[row["protocol"]] = row
    headers = ["n"]
    for p in protocols:
        headers += [
            f"{p} k",
            f"{p} site ms",
            f"{p} site B sent",
            f"{p} site B recv",
            f"{p} server s",
        ]
    if "secagg+" in protocols and "secagg" in protocols:
        headers += ["site s secagg+/secagg", "bytes sent secagg+/secagg"]
    lines = []
    for n, per in by_n.items():
        line: list[Any] = [n]
        for p in protocols:
            r = per.get(p)
            if r is None:
                line += ["-"] * 5
                continue
            line += [
                r["k"],
                r["site_seconds_mean"] * 1e3,
                int(r["site_bytes_sent_mean"]),
                int(r["site_bytes_received_mean"]),
                r["server_seconds"],
            ]
        if "secagg+" in protocols and "secagg" in protocols and len(per) < 2:
            line += ["-", "-"]
        elif "secagg+" in per and "secagg" in per:
            plus, full = per["secagg+"], per["secagg"]
            line += [
                plus["site_seconds_mean"] / full["site_seconds_mean"],
                plus["site_bytes_sent_mean"] / full["site_bytes_sent_mean"],
            ]
        lines.append(line)
    return rows, markdown_table(headers, lines)


def part_ray(
    sites: int, length: int, *, active: bool, warmup: int = 1
) -> tuple[dict[str, Any], str]:
    """Part (a): secure_fl SecAgg+ rounds of ``sites`` Ray-simulated sites (``warmup`` rounds,
    then the measured one); figures and table. Peak memory covers every round."""
    from flower_side_by_side import ours_available, run_ours

    pending = ours_available()
    if pending is not None:
        return {"pending": pending}, f"(a) not run: {pending}"
    memory = ProcessMemory().start()
    with tempfile.TemporaryDirectory(prefix="flower-scale-") as tmp:
        result = run_ours(sites, length, Path(tmp), active=active, warmup=warmup)
    actors = memory.stop()
    result.update(
        server_peak_rss_mib=peak_rss_mib(),
        actor_peak_rss_mib=actors,
        actor_peak_rss_mib_max=max(actors.values(), default=0.0),
    )
    rows = [
        ["sites x values", f"{sites} x {length}"],
        ["rounds (warm-up + measured)", f"{warmup} + 1"],
        ["round wall s", result["round_wall_s"]],
        ["server compute s", result["server_s"]],
        ["site s (mean / max)", f"{result['site_seconds_mean']:.3g} / {result['site_seconds_max']:.3g}"],
        ["bytes to / from site (mean)", f"{result['bytes_to_site_mean']:.4g} / {result['bytes_from_site_mean']:.4g}"],
        ["survivors", result.get("survivors")],
        ["server peak RSS MiB", result["server_peak_rss_mib"]],
        ["Ray actors", len(actors)],
        ["actor peak RSS MiB (max)", result["actor_peak_rss_mib_max"]],
        ["max abs error of the mean", result["max_abs_error"]],
    ]  # fmt: skip
    return result, markdown_table(["(a) Flower simulation, secure_fl SecAgg+", "value"], rows)


def _sizes(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 3:
        raise argparse.ArgumentTypeError(f"--sizes must be integers >= 3, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Command line: run the parts asked for, print markdown, write ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ray", "sites", "both"), default="both")
    parser.add_argument("--ray-sites", type=int, default=100)
    parser.add_argument(
        "--warmup", type=int, default=1, help="part (a) rounds before the measured one"
    )
    parser.add_argument("--length", type=int, default=1_200_000, help="values, part (a)")
    parser.add_argument("--sizes", type=_sizes, default=[50, 100, 200, 500, 1000])
    parser.add_argument("--small-length", type=int, default=1000, help="values, part (b)")
    parser.add_argument("--protocols", default="secagg+,secagg")
    parser.add_argument(
        "--max-complete", type=int, default=None, help="skip SecAgg above this many sites"
    )
    parser.add_argument("--active", action="store_true", help="the active (signed) variant")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args(argv)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = sorted(set(protocols) - {"secagg+", "secagg"})
    if bad or not protocols:
        parser.error(f"--protocols must name secagg+ and/or secagg, got {args.protocols!r}")
    if args.ray_sites < 3 or args.length < 1 or args.small_length < 1 or args.warmup < 0:
        parser.error("--ray-sites must be >= 3, --length and --small-length >= 1, --warmup >= 0")
    quiet_flower()
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.part in ("sites", "both"):
        print(f"(b) per-site cost, {args.small_length} values, run_local:", flush=True)
        progress = None if args.out is None else args.out.with_suffix(".rows.jsonl")
        rows, text = part_sites(
            args.sizes,
            args.small_length,
            protocols,
            active=args.active,
            max_complete=args.max_complete,
            progress=progress,
        )
        out["sites"] = {"rows": rows, "table": text}
        print("\n" + text + "\n")
    if args.part in ("ray", "both"):
        result, text = part_ray(args.ray_sites, args.length, active=args.active, warmup=args.warmup)
        out["ray"] = {"result": result, "table": text}
        print("\n" + text + "\n")
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
