"""One SecAgg+ round on Flower, side by side: Flower's own SecAgg+ against secure_fl's, one process.

Run: ``.venv/bin/python benchmarks/flower_side_by_side.py --sites 10 --length 100000 --out r.json``
(``--length 1200000`` for the 1.2 M-value figure; ``--only flower`` / ``--only ours`` for one side;
``--warmup N`` rounds before the measured one, default 1; ``--active`` for secure_fl's signed variant).

Both rounds run in Flower's Simulation Runtime (``flwr.simulation.run_simulation``, Ray backend),
the same ``--sites`` virtual SuperNodes, each site's update the same float32 vector of
``--length`` values drawn from a seeded generator (values in [-1, 1], so Flower's +-8 clip cuts
nothing), the same degree and threshold (secure_fl's plan for ``--sites`` sites with
``dropout_rate`` 0.1: Flower gets ``num_shares = k + 1`` and ``reconstruction_threshold = t``):

* **Flower**: ``ServerApp`` with ``@app.main()``, a ``LegacyContext`` and
  ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``; ``ClientApp(client_fn=...,
  mods=[timing, secaggplus_mod])`` whose ``NumPyClient.fit`` returns the model plus the vector.
* **secure_fl**: ``ServerApp`` calling
  ``secure_fl.integrations.flower.workflow.SecureAggregationWorkflow.run_round``; ``ClientApp``
  with ``mods=[timing, make_secure_fl_mod(...)]`` and an ``@app.train()`` returning the global
  model plus the vector (the site's update is the difference), sites provisioned with
  ``provision_flower`` (semi-honest variant unless ``--active``).

Measured: **site s** -- wall seconds inside the timing mod (the protocol mod and the user's
function) per site, summed over the site's messages, mean over sites; **to/from site** -- bytes of
the serialised ``RecordDict`` of each message, per site (:class:`flower_common.TimingGrid`);
**round wall** -- the server's round (Flower: the fit workflow; ours: ``run_round``);
**server s** -- round wall minus the seconds spent inside the Grid (waiting for sites and Flower's
transport), i.e. the server's own compute; **max abs error** -- the released mean against the exact
mean of the vectors. ``--warmup`` FedAvg rounds start Ray's actors, then ``--rounds`` (default 3)
are measured and the fastest is reported, all their walls beside it (the machine is shared:
the fastest round is the least disturbed); every node is registered before the clock starts.
See :data:`NOTES` for what differs between the two protocols (Flower's +-8 clip and
32-bit-seeded Mersenne Twister masks, flwrlabs/flower#7522).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_common import (
    DROPOUT_RATE,
    TimingGrid,
    degree_and_threshold,
    log_lines,
    markdown_table,
    mean,
    peak_rss_mib,
    quiet_flower,
    ratio,
    site_seconds,
    timing_mod,
    wait_for_nodes,
    write_json,
)

#: Both sides run under the same Ray backend: one CPU per ClientApp actor (2 actors on 2 cores).
BACKEND_CONFIG: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def site_vector(partition: int, length: int) -> np.ndarray:
    """Site ``partition``'s update: ``length`` float32 values in [-1, 1] (seeded by partition)."""
    rng = np.random.default_rng(1000 + partition)
    return np.asarray(rng.uniform(-1, 1, length), dtype=np.float32)


def exact_mean(sites: int, length: int) -> np.ndarray:
    """The mean of every site's vector (equal weights), float64."""
    stacked = np.stack([site_vector(p, length).astype(np.float64) for p in range(sites)])
    return np.asarray(stacked.mean(axis=0), dtype=np.float64)


def _summary(
    grid: TimingGrid, wall: float, log: Path, skip: int, sites: int, error: float | None
) -> dict[str, Any]:
    per_site = site_seconds(log, skip=skip)
    return {
        "sites_seen": len(per_site),
        "site_seconds_mean": mean(per_site.values()),
        "site_seconds_max": max(per_site.values(), default=0.0),
        "bytes_to_site_mean": mean(grid.bytes_to.values()),
        "bytes_from_site_mean": mean(grid.bytes_from.values()),
        "round_wall_s": wall,
        "server_s": wall - grid.grid_seconds,
        "grid_s": grid.grid_seconds,
        "max_abs_error": error,
        "sites": sites,
        "exchanges": [list(x) for x in grid.exchanges],
    }


def best_round(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of the measured round with the smallest wall, with every round's wall
    (``round_walls_s``) beside it. Errors: RuntimeError when no round was measured."""
    if not summaries:
        raise RuntimeError("no round was measured (see the log above)")
    best = dict(min(summaries, key=lambda r: r["round_wall_s"]))
    best["round_walls_s"] = [r["round_wall_s"] for r in summaries]
    return best


def simulate_best(
    server_app: Any, client_app: Any, sites: int, summaries: list[dict[str, Any]]
) -> dict[str, Any]:
    """Run the apps on ``sites`` virtual SuperNodes (the shared backend config); the fastest
    measured round the ServerApp appended to ``summaries``, with ``simulation_wall_s``."""
    from flwr.simulation import run_simulation

    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=sites,
        backend_config=BACKEND_CONFIG,
    )
    total = time.perf_counter() - t0
    result = best_round(summaries)
    result["simulation_wall_s"] = total
    return result


def run_flower(
    sites: int, length: int, workdir: Path, *, warmup: int = 1, rounds: int = 1
) -> dict[str, Any]:
    """``warmup`` + ``rounds`` rounds of Flower's own SecAgg+ (legacy API) in
    ``run_simulation``; the figures of the fastest measured round (:func:`best_round`; the
    warm-up rounds pay for starting the Ray actors)."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    k, threshold = degree_and_threshold(sites)
    log = workdir / "flower-sites.jsonl"
    summaries: list[dict[str, Any]] = []
    calls = [0]
    expected = exact_mean(sites, length)

    class Site(NumPyClient):
        def __init__(self, partition: int) -> None:
            self.partition = partition

        def fit(self, parameters: Any, config: Any) -> Any:
            # the model sent plus the update (FedAvg of models == model + mean update)
            return [parameters[0] + site_vector(self.partition, length)], 1, {}

    def client_fn(context: Context) -> Any:
        return Site(int(context.node_config["partition-id"])).to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[timing_mod(log), secaggplus_mod])
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Context) -> None:
        timing = TimingGrid(grid)
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=sites,
            min_available_clients=sites,
            initial_parameters=ndarrays_to_parameters([np.zeros(length, np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=warmup + rounds), strategy=strategy
        )
        secagg = SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=threshold)

        def fit_workflow(g: Any, ctx: Any) -> None:
            # every node registered before the clock starts (Flower samples from a client
            # manager that a background thread fills from the grid)
            ctx.client_manager.wait_for(sites, timeout=600)
            before = parameters_to_ndarrays(
                arrayrecord_to_parameters(ctx.state.array_records["parameters"], keep_input=True)
            )[0]
            timing.reset()
            skip = log_lines(log)
            t0 = time.perf_counter()
            secagg(g, ctx)
            wall = time.perf_counter() - t0
            after = parameters_to_ndarrays(
                arrayrecord_to_parameters(ctx.state.array_records["parameters"], keep_input=True)
            )[0]
            calls[0] += 1
            if calls[0] > warmup:
                error = float(np.max(np.abs(after - before - expected)))
                summaries.append(_summary(timing, wall, log, skip, sites, error))

        DefaultWorkflow(fit_workflow=fit_workflow)(timing, legacy)

    result = simulate_best(server_app, client_app, sites, summaries)
    result.update(
        num_shares=k + 1,
        reconstruction_threshold=threshold,
        warmup_rounds=warmup,
    )
    return result


def ours_available() -> str | None:
    """None when secure_fl's Flower workflow and mod import; else what is missing."""
    for name in ("workflow", "mod", "provision", "node"):
        if importlib.util.find_spec(f"secure_fl.integrations.flower.{name}") is None:
            return f"secure_fl.integrations.flower.{name} is not there yet"
    return None


def run_ours(
    sites: int,
    length: int,
    workdir: Path,
    *,
    active: bool = False,
    warmup: int = 1,
    rounds: int = 1,
) -> dict[str, Any]:
    """``warmup`` + ``rounds`` rounds of secure_fl's SecAgg+ over Flower
    (``SecureAggregationWorkflow`` and the site mod) in ``run_simulation``; the figures of the
    fastest measured round (:func:`best_round`; the warm-up rounds pay for starting the Ray
    actors). Errors: RuntimeError when a round fails."""
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from secure_fl.integrations.flower.mod import make_secure_fl_mod
    from secure_fl.integrations.flower.node import load_flower_site
    from secure_fl.integrations.flower.provision import provision_flower
    from secure_fl.integrations.flower.workflow import SecureAggregationWorkflow
    from secure_fl.rounds import AggregationSpec
    from secure_fl.rounds.policy import SitePolicy

    spec = AggregationSpec(protocol="secagg+", active=active, dropout_rate=DROPOUT_RATE)
    policy = SitePolicy(aggregations=("secagg+",), require_active=active, dropout_rate=DROPOUT_RATE)
    names = [f"site{i:04d}" for i in range(1, sites + 1)]
    federation = provision_flower(names, workdir / "federation", policy=policy)
    configs = {p: str(federation.site_configs[name]) for p, name in enumerate(names)}
    log = workdir / "ours-sites.jsonl"
    summaries: list[dict[str, Any]] = []
    expected = exact_mean(sites, length)

    def site_of(context: Context) -> Any:
        return load_flower_site(configs[int(context.node_config["partition-id"])])

    client_app = ClientApp(mods=[timing_mod(log), make_secure_fl_mod(site_of)])

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        sent = message.content.array_records["arrays"]["w"].numpy()
        update = site_vector(int(context.node_config["partition-id"]), length)
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(sent + update)}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        return Message(content, reply_to=message)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Context) -> None:
        timing = TimingGrid(grid)
        workflow = SecureAggregationWorkflow(spec, federation.roster, min_sites=sites)
        model = np.zeros(length, np.float32)
        nodes = wait_for_nodes(grid, sites)  # every node registered before the clock starts
        for index in range(1, warmup + rounds + 1):
            # FedAvg: each round sends the new global model (a site releases one update per
            # model: sending the same model twice would be refused by its release guard)
            timing.reset()
            skip = log_lines(log)
            t0 = time.perf_counter()
            res = workflow.run_round(
                timing,
                arrays=ArrayRecord({"w": Array(model)}),
                config=ConfigRecord({}),
                round_index=index,
                node_ids=nodes,
            )
            wall = time.perf_counter() - t0
            got = None if res.mean is None else res.mean["w"].numpy().astype(np.float64)
            if got is not None:
                model = (model + got).astype(np.float32)
            if index <= warmup:
                continue
            error = None if got is None else float(np.max(np.abs(got - expected)))
            summary = _summary(timing, wall, log, skip, sites, error)
            summary.update(
                survivors=len(res.outcome.survivors),
                workflow_seconds=float(res.seconds),
                workflow_bytes_to_sites=int(res.bytes_to_sites),
                workflow_bytes_from_sites=int(res.bytes_from_sites),
            )
            summaries.append(summary)

    result = simulate_best(server_app, client_app, sites, summaries)
    result.update(active=active, warmup_rounds=warmup)
    return result


ROWS = (
    ("site s (mean)", "site_seconds_mean"),
    ("site s (max)", "site_seconds_max"),
    ("bytes to site (mean)", "bytes_to_site_mean"),
    ("bytes from site (mean)", "bytes_from_site_mean"),
    ("server s (compute)", "server_s"),
    ("round wall s", "round_wall_s"),
    ("max abs error of the mean", "max_abs_error"),
)


def table(flower: dict[str, Any] | None, ours: dict[str, Any] | None) -> str:
    """The markdown table of both sides (a missing side reads "n/a")."""
    rows = []
    for label, key in ROWS:
        f = None if flower is None else flower.get(key)
        o = None if ours is None else ours.get(key)
        rows.append(
            [
                label,
                "n/a" if f is None else f,
                "n/a" if o is None else o,
                ratio(o, f) if f is not None and o is not None else "n/a",
            ]
        )
    return markdown_table(["", "Flower SecAgg+", "secure_fl SecAgg+", "ours/Flower"], rows)


NOTES = (
    "Notes: each side runs warm-up rounds (Ray start-up), then measured rounds; the fastest "
    "measured round is shown (a shared 2-core machine). Flower quantises to a +-8 clip range (values outside are cut), scales each "
    "update by num_examples / max_weight (1000) before quantising (hence its ~1e-3 error) and "
    "seeds its masks with a 32-bit-folded seed into a Mersenne Twister (flwrlabs/flower#7522: "
    "2^32 seeds, brute-forceable); its global model comes back float64, so from round 2 it "
    "sends 8 bytes per value, secure_fl 4 (float32 model, 32-bit masked words). secure_fl "
    "derives masks with AES-CTR from 256-bit agreed keys, binds every message to the round, "
    "checks the survivor/dropout sets and seals each site's state between messages (its site "
    "seconds include that). Site seconds: wall inside a timing mod around each protocol mod "
    "(Ray actors share 2 cores, so they include contention); bytes: serialised RecordDicts; "
    "server s = round wall - time inside the Grid."
)


def main(argv: list[str] | None = None) -> int:
    """Command line: run both sides, print the table, write ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10, help="virtual sites (>= 3)")
    parser.add_argument("--length", type=int, default=100_000, help="float32 values per update")
    parser.add_argument("--only", choices=("flower", "ours", "both"), default="both")
    parser.add_argument("--active", action="store_true", help="secure_fl's active variant")
    parser.add_argument(
        "--warmup", type=int, default=1, help="rounds run before the measured ones (Ray start-up)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds (the fastest is reported)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args(argv)
    if args.sites < 3:
        parser.error(f"--sites must be >= 3, got {args.sites}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.length < 1:
        parser.error(f"--length must be >= 1, got {args.length}")
    quiet_flower()
    flower = ours = None
    pending = None
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        work = Path(tmp)
        if args.only in ("flower", "both"):
            flower = run_flower(
                args.sites, args.length, work, warmup=args.warmup, rounds=args.rounds
            )
        if args.only in ("ours", "both"):
            pending = ours_available()
            if pending is None:
                ours = run_ours(
                    args.sites,
                    args.length,
                    work,
                    active=args.active,
                    warmup=args.warmup,
                    rounds=args.rounds,
                )
    text = table(flower, ours)
    print(f"\n{args.sites} sites x {args.length} float32 values, one SecAgg+ round\n")
    print(text)
    if pending:
        print(f"\nsecure_fl side not run: {pending}")
    print("\n" + NOTES)
    write_json(
        args.out,
        {
            "sites": args.sites,
            "length": args.length,
            "flower": flower,
            "secure_fl": ours,
            "secure_fl_pending": pending,
            "peak_rss_mib": peak_rss_mib(),
            "table": text,
            "notes": NOTES,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
