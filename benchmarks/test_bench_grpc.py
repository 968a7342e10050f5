"""A SecAgg+ round over gRPC (mutual TLS, 10 site processes and a server on loopback) against the
in-process simulation of the same round, measured in one run (pytest-benchmark).

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_grpc.py -m '' -p no:randomly
--benchmark-only --benchmark-columns=min,median,rounds``.

* Baseline ("in-process simulation (baseline)"): every site's synthetic update, the encoding plan,
  the encoding, :func:`secure_fl.secagg.run_round` (all parties in one process, one after the
  other) and the decoding: :func:`secure_fl.transport.simulation.simulate_round`.
* Network: the same round in a running federation. Each timed call waits for the server's next
  round record, so it measures the round period seen from outside (model download, the sites'
  update and encoding, every protocol phase, decoding, and the server's checkpoint). One warm-up
  round runs first (process start, first connections). ``server_round_s`` is the server's own
  measurement without the checkpoint; ``secagg_s`` its secure-aggregation part (from the setup
  to the result: encoding, every phase, unmasking), to compare with the baseline's
  ``protocol_s`` (planning, encoding, ``run_round``, decoding; no model distribution, no task).
* Bytes: ``grpc_MB`` is the gRPC message payload of the round (requests and responses, counted by
  the server), ``model_MB`` its model-download part, ``lo_MB`` what crossed the loopback device
  (IP, TCP, TLS and HTTP/2 framing included; any other loopback traffic on the machine too), and
  ``inproc_MB`` the simulation's compact encoding (``wire_size``), which has no model download.
  Each timed call of either kind is one round; the sites' synthetic targets are drawn before
  timing in both.
* Wire work (``test_wire_work_per_round``): the serialisation, hashing and copying the gRPC path
  does per round and the in-process round does not, measured component by component in one
  process without sockets (TLS, HTTP/2 and gRPC's own copies are not in it). At 4.8 M the SHA-256
  passes dominate: every site hashes the model download twice (chunk trailer, then the
  announced digest) plus its float64 content digest and its upload; the server hashes each
  upload and the model blob.
* Profiles: with ``SECURE_FL_BENCH_PROFILE_DIR=DIR`` every process runs under cProfile and writes
  ``DIR/<process>.log.prof`` when the federation ends (read them with ``pstats``).
* CPU: ``cpu_s`` sums user and system time of the server and all site processes over the round;
  ``inproc_cpu_s`` is the simulation's. On a machine with several cores the site processes run in
  parallel, so wall time can beat the single-threaded simulation while using more CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secure_fl.crypto import SigningKey
from secure_fl.transport.config import load_server_config
from secure_fl.transport.provision import provision
from secure_fl.transport.rounds import initial_model, vector_sha256
from secure_fl.transport.simulation import compute_results, simulate_round
from secure_fl.transport.tasks import SyntheticTask

pytestmark = pytest.mark.slow

SITES = 10
SEED = 5
# (shapes, timed rounds): 1.2 M and 4.8 M float32 parameters, in a few tensors.
SIZES = {
    "1.2M": ([[1000, 1000], [200_000]], 3),
    "4.8M": ([[2000, 2000], [800_000]], 2),
}
REPO = Path(__file__).resolve().parents[1]
#: Environment variable naming a folder: run every process under cProfile, one .prof per process.
PROFILE_ENV = "SECURE_FL_BENCH_PROFILE_DIR"
_CLK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK


def _loopback_bytes() -> int:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                cols = rest.split()
                return int(cols[8])  # transmitted (each loopback byte is also counted received)
    except OSError:
        pass
    return 0


def _read_json(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON object in ``path``, retried while the file is still being written."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return data
        except json.JSONDecodeError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} holds no JSON object")
        time.sleep(0.01)


class _Federation:
    def __init__(self, root: Path, shapes: list[list[int]], rounds: int) -> None:
        names = [f"site{i:02d}" for i in range(1, SITES + 1)]
        done = provision(
            root,
            names,
            rounds=rounds,
            protocol="secagg+",
            listen="127.0.0.1:0",
            ckks=False,
            model_shapes=shapes,  # the sites' policies pin the model's vector length
        )
        server = json.loads(done.server_config.read_text())
        server.update(
            insecure_test_seed=SEED,
            deadlines={"update_s": 600.0, "phase_s": 600.0, "linger_s": 5.0, "poll_wait_s": 5.0},
        )
        server["aggregation"].update(dropout_rate=0.1, corrupt_fraction=0.0)
        done.server_config.write_text(json.dumps(server))
        self.config_path = done.server_config
        self.state = done.server_config.parent / "state"
        self.names = names
        self.site_configs = done.site_configs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.root = root

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        # PROFILE_DIR set: each process runs under cProfile and writes <log>.prof when it exits
        # (the federation runs its last round, then every process ends normally).
        profile = os.environ.get(PROFILE_ENV)
        prefix = ["-m", "cProfile", "-o", str(Path(profile) / f"{log}.prof")] if profile else []
        with open(self.root / log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *prefix, "-m", "secure_fl.transport.cli", *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._spawn(["server", str(self.config_path)], "server.log")
        endpoint = self.state / "endpoint.json"
        self.wait_for(endpoint, 60)
        address = _read_json(endpoint)["address"]
        for name in self.names:
            path = self.site_configs[name]
            config = json.loads(path.read_text())
            config.update(
                server=address,
                insecure_test_seed=SEED,
                output_model=None,
                task={"kind": "synthetic", "options": {"seed": SEED}},
            )
            path.write_text(json.dumps(config))
            self._spawn(["site", str(path)], f"{name}.log")

    def record_path(self, round_id: int) -> Path:
        return self.state / "rounds" / f"round-{round_id:06d}.json"

    def wait_for(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {path}")
            if any(p.poll() not in (None, 0) for p in self.procs):
                raise AssertionError(f"a process failed; see logs in {self.root}")
            time.sleep(0.002)

    def record(self, round_id: int) -> dict[str, Any]:
        return _read_json(self.record_path(round_id))

    def stop(self) -> None:
        if os.environ.get(PROFILE_ENV):  # let the processes end by themselves and write profiles
            deadline = time.monotonic() + 120
            while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
                time.sleep(0.1)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("size_name", list(SIZES))
def test_inprocess_round_baseline(benchmark: Any, size_name: str, workdir: Path) -> None:
    shapes, _ = SIZES[size_name]
    fed = _Federation(workdir / "fed", shapes, rounds=1)
    config = load_server_config(fed.config_path)
    model = initial_model(config.model)
    tasks = {i: SyntheticTask(n, seed=SEED) for i, n in enumerate(fed.names, start=1)}
    compute_results(tasks, model, 0)  # warm-up: the sites' targets are drawn once, as over gRPC
    keys = {i: SigningKey.generate() for i in tasks}  # active variant; keys do not enter the sum
    benchmark.group = f"SecAgg+ round, {SITES} sites, {size_name}"
    benchmark.name = "in-process simulation (baseline)"
    cpu: list[float] = []
    protocol: list[float] = []

    def one_round() -> Any:
        c0 = time.process_time()
        results = compute_results(tasks, model, 0)
        sim = simulate_round(
            model, results, config.aggregation, 0, test_seed=SEED, signing_keys=keys
        )
        cpu.append(time.process_time() - c0)
        protocol.append(sim.seconds)
        return sim

    sim = benchmark.pedantic(one_round, rounds=3, iterations=1)
    inproc = sum(c.bytes_sent for c in sim.result.clients.values()) + sim.result.server.bytes_sent
    benchmark.extra_info.update(
        inproc_MB=round(inproc / 1e6, 2),
        inproc_cpu_s=round(min(cpu), 2),
        protocol_s=round(min(protocol), 2),
        k=sim.config.degree,
        threshold=sim.config.threshold,
        sum_sha256=vector_sha256(sim.total)[:16],
    )


@pytest.mark.parametrize("size_name", list(SIZES))
def test_grpc_round(benchmark: Any, size_name: str, workdir: Path) -> None:
    shapes, timed = SIZES[size_name]
    fed = _Federation(workdir / "fed", shapes, rounds=timed + 1)
    try:
        fed.start()
        fed.wait_for(fed.record_path(0), 600)  # warm-up round
        pids = [p.pid for p in fed.procs]
        state = {"next": 1}
        samples: list[dict[str, float]] = []

        def next_round() -> None:
            r = state["next"]
            c0, lo0 = _cpu_seconds(pids), _loopback_bytes()
            fed.wait_for(fed.record_path(r), 600)
            samples.append({"cpu": _cpu_seconds(pids) - c0, "lo": _loopback_bytes() - lo0})
            state["next"] = r + 1

        benchmark.group = f"SecAgg+ round, {SITES} sites, {size_name}"
        benchmark.name = "gRPC + mTLS, 10 site processes + server"
        benchmark.pedantic(next_round, rounds=timed, iterations=1)
        records = [fed.record(r) for r in range(1, timed + 1)]
        assert all(rec["completed"] and not rec["dropped"] for rec in records)

        # The warm-up round equals the in-process simulation bit for bit.
        config = load_server_config(fed.config_path)
        model = initial_model(config.model)
        tasks = {i: SyntheticTask(n, seed=SEED) for i, n in enumerate(fed.names, start=1)}
        keys = {i: SigningKey.generate() for i in tasks}
        sim = simulate_round(
            model,
            compute_results(tasks, model, 0),
            config.aggregation,
            0,
            test_seed=SEED,
            signing_keys=keys,
        )
        assert fed.record(0)["sum_sha256"] == vector_sha256(sim.total)

        last = records[-1]
        benchmark.extra_info.update(
            server_round_s=round(min(r["seconds"] for r in records), 2),
            # secagg_s: the server's secure-aggregation part, when its records carry it.
            secagg_s=min(
                (r["secagg_seconds"] for r in records if "secagg_seconds" in r), default=None
            ),
            grpc_MB=round((last["bytes_in"] + last["bytes_out"]) / 1e6, 2),
            model_MB=round(last["model_bytes_out"] / 1e6, 2),
            lo_MB=round(min(s["lo"] for s in samples) / 1e6, 2),
            cpu_s=round(min(s["cpu"] for s in samples), 2),
            k=last["k"],
            threshold=last["threshold"],
        )
    finally:
        fed.stop()


def _best(call: Any, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("size_name", list(SIZES))
def test_wire_work_per_round(benchmark: Any, size_name: str, capsys: Any) -> None:
    """Where the gRPC path's own CPU goes, without sockets: the per-round serialisation, hashing
    and copying that the in-process round does not do (TLS, HTTP/2 and gRPC are not in it). Each
    component is the best of 3 in ms; ``*_round_ms`` scales them to one round (10 sites)."""
    import hashlib

    import numpy as np

    from secure_fl.rounds.protobuf import masked_from_payload, masked_to_bytes
    from secure_fl.secagg.messages import MaskedInput
    from secure_fl.transport import tensors
    from secure_fl.transport._generated import federation_pb2 as pb
    from secure_fl.transport.checkpoint import model_blob
    from secure_fl.transport.chunks import iter_chunk_bytes, receive_raw

    shapes, _ = SIZES[size_name]
    rng = np.random.default_rng(0)
    model = {
        f"w{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(shapes)
    }
    blob, digest_hex = model_blob(model)
    digest = bytes.fromhex(digest_hex)
    chunk = 1 << 20
    header = pb.PayloadHeader(kind=pb.MODEL, length=len(model))
    stream = list(iter_chunk_bytes(header, blob, chunk))
    size = sum(v.size for v in model.values())
    masked = MaskedInput(0, 1, rng.integers(0, 2**32, size=size, dtype=np.uint32))
    upload = list(
        iter_chunk_bytes(pb.PayloadHeader(kind=pb.MASKED_INPUT), masked_to_bytes(masked, 32), chunk)
    )

    def receive(chunks: list[bytes]) -> bytearray:
        return receive_raw(
            iter(chunks), max_chunk=chunk, max_total=1 << 31, check_header=lambda h: None
        )[1]

    parts = {
        # server, once per round: the new global model
        "server_dumps": lambda: tensors.dumps(model),
        "server_sha256_of_blob": lambda: hashlib.sha256(blob).digest(),
        "server_chunk_stream_hashing": lambda: list(iter_chunk_bytes(header, blob, chunk)),
        "server_chunk_stream_given_sha": lambda: list(
            iter_chunk_bytes(header, blob, chunk, sha256=digest)
        ),
        # site, once per round: model download and upload of the masked input
        "site_receive_model": lambda: receive(stream),
        "site_sha256_again": lambda: hashlib.sha256(blob).digest(),
        "site_loads": lambda: tensors.loads(blob),
        "site_release_key": lambda: tensors.release_key(model),
        "site_upload_chunks": lambda: list(
            iter_chunk_bytes(pb.PayloadHeader(), masked_to_bytes(masked, 32), chunk)
        ),
        # server, once per site: the masked input upload
        "server_receive_upload": lambda: masked_from_payload(
            pb.PayloadHeader(kind=pb.MASKED_INPUT, bits=32, length=size), receive(upload), 1
        ),
    }
    benchmark.group = f"wire work per round, one process, {size_name}"
    benchmark.name = "serialise, hash, copy (no sockets)"
    ms = benchmark.pedantic(
        lambda: {name: 1e3 * _best(call) for name, call in parts.items()}, rounds=1, iterations=1
    )
    site = sum(v for k, v in ms.items() if k.startswith("site_"))
    server = (
        ms["server_dumps"]
        + ms["server_sha256_of_blob"]
        + ms["server_chunk_stream_hashing"]
        + SITES * ms["server_receive_upload"]
    )
    benchmark.extra_info.update({k: round(v, 1) for k, v in ms.items()})
    benchmark.extra_info.update(
        site_round_ms=round(SITES * site, 1),
        server_round_ms=round(server, 1),
        model_MB=round(len(blob) / 1e6, 1),
    )
    with capsys.disabled():
        print(f"\nwire work per round ({size_name}, ms):")
        for name, value in ms.items():
            print(f"  {name:<34} {value:8.1f}")
        print(f"  {'all sites per round':<34} {SITES * site:8.1f}")
        print(f"  {'server per round':<34} {server:8.1f}")
