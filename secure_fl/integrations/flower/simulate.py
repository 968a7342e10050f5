"""One aggregation through a real Flower ServerApp and ClientApps (``run_simulation``).

:func:`simulate` has the signature and result of ``aggregators.create(protocol, **options)
.aggregate(updates, weights, dropped=dropped)``, but every message crosses Flower: the sites are
provisioned with :func:`~secure_fl.integrations.flower.provision.provision_flower` into a
temporary folder, each site's update is written there as ``.npy`` (never captured in the apps:
Ray pickles them), each ClientApp is ``ClientApp(mods=[dropout mod, secure_fl mod])`` around a
train function that returns the site's update, and the ServerApp runs
:class:`~secure_fl.integrations.flower.workflow.SecureAggregationWorkflow` once with no global
model (the sites' arrays are their updates).

``dropped`` sites fail (raise) when asked for their masked input (SecAgg: the step that delivers
their shares; plain and CKKS: the setup), which Flower turns into an error reply: a dropout.
The harness holds every key, so for CKKS it decrypts the encrypted mean with one site's secret
context (as every site does for itself).

The report has exactly :data:`~secure_fl.aggregators.base.REPORT_KEYS`. Filled as the in-process
aggregator fills them: ``included``, ``dropped``, ``excluded``, the protocol's parameters,
``max_error``, ``clipped`` / ``clipped_updates`` (recomputed by the harness from the updates,
exactly as each site clips), ``bytes_sent`` (site -> bytes of the frames it sent over Flower),
``server_bytes_sent``, ``server_seconds`` (SecAgg), ``decrypt_seconds`` (CKKS), ``seconds``,
``round`` (0, a fresh aggregator's first round). ``site_seconds`` (and for CKKS
``server_seconds``) is None: the sites run in Ray workers, the CKKS server half keeps no clock; where the aggregator leaves a key None (plain: ``round``, the server's) so does this.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.aggregators.base import (
    AggregationReport,
    AggregationResult,
    Updates,
    prepare,
    warn_clipped,
)
from secure_fl.encoding import l2_clip, unflatten
from secure_fl.errors import ConfigError
from secure_fl.integrations.flower import records
from secure_fl.rounds.local import in_process_policy
from secure_fl.rounds.spec import AggregationSpec

log = logging.getLogger("secure_fl.integrations.flower")

#: File of a site's update (flat float64) and weight in its provisioned folder.
UPDATE_FILE = "update.npy"
WEIGHT_FILE = "weight.npy"
#: The Ray backend: one CPU per ClientApp actor, Ray's own logs at ERROR and not forwarded (a
#: site that leaves says why in its reply, which the workflow logs).
BACKEND_CONFIG: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"logging_level": "ERROR", "log_to_driver": False},
}
#: How long the ServerApp waits for the simulated nodes and for each stage (seconds).
STAGE_TIMEOUT_S = 120.0


class SiteByPartition:
    """The FlowerSite of a simulated node: ``configs[partition-id]`` (picklable: paths only)."""

    def __init__(self, configs: Sequence[str]) -> None:
        self.configs = tuple(configs)

    def __call__(self, context: Any) -> Any:
        from secure_fl.integrations.flower.node import load_flower_site

        return load_flower_site(self.configs[int(context.node_config["partition-id"])])


class TrainFromFile:
    """The user's train function of a simulated node: replies with the update and weight read
    from the node's folder (``folders[partition-id]``)."""

    def __init__(self, folders: Sequence[str]) -> None:
        self.folders = tuple(folders)

    def __call__(self, message: Any, context: Any) -> Any:
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        folder = Path(self.folders[int(context.node_config["partition-id"])])
        update = np.load(folder / UPDATE_FILE, allow_pickle=False)
        weight = float(np.load(folder / WEIGHT_FILE, allow_pickle=False))
        content = RecordDict(
            {
                "arrays": ArrayRecord({"update": Array(update)}),
                "metrics": MetricRecord({"num-examples": weight}),
            }
        )
        return Message(content, reply_to=message)


class DropAtInput:
    """A test mod (placed before the secure_fl mod): the nodes of ``partitions`` raise when
    asked for their masked input (``protocol`` SecAgg: a ``step`` whose frame is a
    ShareDelivery; plain / CKKS: the ``setup``), so Flower replies with an error: a dropout."""

    def __init__(self, partitions: Iterable[int], protocol: str) -> None:
        self.partitions = frozenset(partitions)
        self.protocol = protocol

    def __call__(self, message: Any, context: Any, call_next: Any) -> Any:
        if int(context.node_config["partition-id"]) in self.partitions:
            env = records.read(message.content)
            if env is not None and self._is_input(env):
                raise RuntimeError("simulated dropout before the masked input")
        return call_next(message, context)

    def _is_input(self, env: records.Envelope) -> bool:
        if self.protocol not in ("secagg", "secagg+"):
            return env.stage == "setup"
        if env.stage != "step" or env.frame is None:
            return False
        from secure_fl.rounds import codec
        from secure_fl.secagg.messages import ShareDelivery

        return isinstance(codec.decode(env.frame), ShareDelivery)


def simulate(
    updates: Updates,
    weights: Mapping[str, float] | None = None,
    *,
    protocol: str,
    dropped: Iterable[str] = (),
    **options: Any,
) -> AggregationResult:
    """The weighted mean of the updates of the sites not in ``dropped``, computed by one
    secure_fl round over Flower's simulation engine (Ray, one CPU per ClientApp); same
    arguments and result as ``aggregators.create(protocol, **options).aggregate(...)``.

    ``options``: the fields of :class:`~secure_fl.rounds.spec.AggregationSpec` for
    ``protocol``; for CKKS also ``measure_error`` (default True). ``seed`` and the CKKS
    contexts are refused (ConfigError): the sites draw their secrets from the OS CSPRNG and
    keys are provisioned for the call. At least two sites (every protocol).

    Errors: as the aggregator (ConfigError, InvalidUpdateError; ThresholdError when too few
    survive); RuntimeError when the simulation itself fails.
    """
    start = time.perf_counter()
    spec, driver = AggregationSpec.split_options(protocol, options, where="options")
    measure_error = driver.pop("measure_error", True)
    if driver:
        raise ConfigError(
            f"simulate does not take {sorted(driver)}: the sites' secrets come from the OS "
            "CSPRNG and the keys are provisioned for the call"
        )
    if not isinstance(measure_error, bool):
        raise ConfigError(f"measure_error must be a bool, got {measure_error!r}")
    prepared = prepare(updates, weights, dropped, min_sites=2)
    if protocol == "ckks":
        from secure_fl.he.decrypt import require_two_contributors

        require_two_contributors(len(prepared.survivors))
    sites = prepared.sites
    names = {s: f"site-{i + 1}" for i, s in enumerate(sites)}
    size = prepared.spec.size
    with tempfile.TemporaryDirectory(prefix="secure-fl-flower-") as tmp:
        run = _run(spec, prepared, names, Path(tmp))
    outcome, result, decrypted, decrypt_seconds = run
    by_id = {i + 1: s for i, s in enumerate(sites)}
    if decrypted is not None:
        mean = decrypted
    else:
        if result.mean is None:
            raise ConfigError("the round produced no mean")
        mean = records.flatten(result.mean, where="mean")[0]
    clipped, clipped_updates = _clipping(spec, prepared)
    if spec.masked:
        for site in sites:
            warn_clipped(protocol, site, clipped[site], size, spec.clip_range)
    survivors = [by_id[i] for i in sorted(outcome.survivors)]
    sent = {by_id[i]: int(b) for i, b in result.site_bytes.items()}
    record = outcome.record
    fields: dict[str, Any] = {
        "aggregator": protocol,
        "included": survivors,
        "dropped": sorted(by_id[i] for i in outcome.dropped),
        "clipped": clipped,
        "clipped_total": sum(clipped.values()),
        "clipped_updates": clipped_updates,
        "bytes_sent": sent,
        "server_bytes_sent": int(result.bytes_to_sites),
        "round": 0,
        "expansion": _expansion([sent.get(s, 0) for s in survivors], size),
    }
    if protocol == "plain":  # as PlainAggregator: float32 bytes, no server measurements
        fields.update(max_error=0.0, max_rel_error=0.0, expansion=1.0, round=None)
        fields.update(bytes_sent={s: 4 * size for s in survivors}, server_bytes_sent=None)
    elif spec.masked:
        fields.update(
            server_seconds=float(record["server_seconds"]),
            max_error=float(record["max_error"]),
            threshold=int(record["threshold"]),
            k=int(record["k"]),
            active=bool(record["active"]),
            excluded=sorted(by_id[i] for i in outcome.excluded if i in by_id),
            bits=int(record["bits"]),
            frac_bits=int(record["frac_bits"]),
            clip_range=float(record["clip_range"]),
        )
    else:
        fields.update(_ckks_fields(spec, prepared, outcome, mean, measure_error))
        fields.update(
            bytes_sent={s: sent.get(s, 0) for s in sites}, decrypt_seconds=decrypt_seconds
        )
    fields["seconds"] = time.perf_counter() - start
    report = AggregationReport(**fields)
    return AggregationResult(unflatten(np.asarray(mean), prepared.spec), report.as_dict())


def _run(spec: AggregationSpec, prepared: Any, names: Mapping[str, str], root: Path) -> Any:
    """Provision, write the updates, run the simulation; (outcome, result, CKKS mean or None,
    decrypt seconds)."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from secure_fl.integrations.flower.mod import make_secure_fl_mod
    from secure_fl.integrations.flower.node import load_flower_site
    from secure_fl.integrations.flower.provision import provision_flower
    from secure_fl.integrations.flower.workflow import SecureAggregationWorkflow

    sites = prepared.sites
    size = prepared.spec.size
    policy = dataclasses.replace(in_process_policy(spec), vector_length=size)
    fed = provision_flower(
        [names[s] for s in sites],
        root / "federation",
        federation="simulate",
        policy=policy,
        ckks_preset=(spec.preset or "n8192-add") if spec.protocol == "ckks" else None,
    )
    configs = [str(fed.site_configs[names[s]]) for s in sites]
    folders = []
    for s in sites:
        folder = root / "updates" / names[s]
        folder.mkdir(parents=True, mode=0o700)
        np.save(folder / UPDATE_FILE, np.asarray(prepared.vectors[s], dtype=np.float64))
        np.save(folder / WEIGHT_FILE, np.float64(prepared.weights[s]))
        folders.append(str(folder))
    drop = [i for i, s in enumerate(sites) if s in prepared.dropped]
    client_app = ClientApp(
        mods=[DropAtInput(drop, spec.protocol), make_secure_fl_mod(SiteByPartition(configs))]
    )
    client_app.train()(TrainFromFile(folders))
    layout = records.Layout(("update",), ((size,),), (np.dtype(np.float64).str,))
    workflow = SecureAggregationWorkflow(
        spec,
        fed.roster,
        min_sites=2,
        stage_timeout_s=STAGE_TIMEOUT_S,
        ckks_public=fed.ckks_public,
        ckks_fingerprint=fed.ckks_fingerprint,
    )
    box: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        nodes = _wait_for(grid, len(sites))
        box["result"] = workflow.run_round(grid, arrays=None, layout=layout, node_ids=nodes)

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # Flower's INFO chatter; its errors still show
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(sites),
            backend_config=copy.deepcopy(BACKEND_CONFIG),  # Flower edits it in place
            verbose_logging=False,
        )
    finally:
        flwr_log.setLevel(level)
    if "result" not in box:
        raise RuntimeError("the Flower simulation ended without a round result")
    result = box["result"]
    outcome = result.outcome
    if spec.protocol != "ckks":
        return outcome, result, None, None
    from secure_fl.he.context import SecretContext
    from secure_fl.he.site import decrypt_model

    if outcome.encrypted is None:
        raise ConfigError("the CKKS round produced no encrypted model")
    site = load_flower_site(configs[0])
    if site.ckks is None:
        raise ConfigError("the provisioned site holds no CKKS context")
    t0 = time.perf_counter()
    secret = SecretContext.load(site.ckks.context, expected_fingerprint=site.ckks.fingerprint)
    model = decrypt_model(secret, outcome.encrypted, expected_size=size)
    return outcome, result, np.asarray(model["update"], dtype=np.float64), time.perf_counter() - t0


def _wait_for(grid: Any, count: int) -> list[int]:
    """Every simulated node's id, once all ``count`` are registered."""
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes
        time.sleep(0.1)


def _clipping(spec: AggregationSpec, prepared: Any) -> tuple[dict[str, int], list[str]]:
    """Per site the values beyond ``clip_range`` (SecAgg; else 0) after the L2 clip, and the
    sites whose update the L2 clip scaled, as each site computes them."""
    clipped: dict[str, int] = {}
    l2_clipped: list[str] = []
    active = prepared.sites if spec.protocol != "ckks" else prepared.survivors
    for site in prepared.sites:
        vector = np.asarray(prepared.vectors[site], dtype=np.float64)
        if spec.l2_clip is not None:
            vector, info = l2_clip(vector, spec.l2_clip)
            if info.clipped and site in active:
                l2_clipped.append(site)
        bound = np.float64(spec.clip_range)
        beyond = int(np.count_nonzero(vector > bound)) + int(np.count_nonzero(vector < -bound))
        clipped[site] = beyond if spec.masked else 0
    if spec.protocol == "plain":
        l2_clipped = [s for s in l2_clipped if s in prepared.survivors]
    return clipped, l2_clipped


def _expansion(sent: Sequence[int], size: int) -> float | None:
    return (sum(sent) / len(sent)) / (4 * size) if sent and size else None


def _ckks_fields(
    spec: AggregationSpec, prepared: Any, outcome: Any, mean: np.ndarray, measure: bool
) -> dict[str, Any]:
    from secure_fl.he.params import get_preset

    preset = get_preset(spec.preset)
    record = outcome.record
    max_error = rel = math.nan
    if measure:
        survivors = prepared.survivors
        total = math.fsum(prepared.weights[s] for s in survivors)
        plain = sum(prepared.weights[s] * prepared.vectors[s] for s in survivors) / total
        max_error = float(np.max(np.abs(mean - plain))) if plain.size else 0.0
        peak = float(np.max(np.abs(plain))) if plain.size else 0.0
        rel = max_error / peak if peak > 0 else max_error
    return {
        "max_error": max_error,
        "max_rel_error": rel,
        "preset": preset.name,
        "poly_modulus_degree": preset.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(preset.coeff_mod_bit_sizes),
        "scale_bits": preset.scale_bits,
        "max_abs": preset.max_abs,
        "ciphertexts": record.get("ciphertexts"),
        "chunks": record.get("chunks"),
        "chunk_ciphertexts": spec.chunk_ciphertexts,
        "peak_pending_chunks": record.get("peak_pending_chunks"),
        "fingerprint": record.get("ckks_fingerprint"),
        "workers": spec.workers,
    }


__all__ = ["DropAtInput", "SiteByPartition", "TrainFromFile", "simulate"]
