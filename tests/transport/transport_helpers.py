"""Test helpers: a provisioned federation on loopback, run as real processes.

Every process is started with ``python -m secure_fl.transport.cli``, logs to a file under the
federation directory, and is killed on teardown. Every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from secure_fl.crypto import SigningKey
from secure_fl.secagg import Phase
from secure_fl.transport.checkpoint import model_blob
from secure_fl.transport.config import load_server_config
from secure_fl.transport.provision import provision
from secure_fl.transport.rounds import initial_model, vector_sha256
from secure_fl.transport.simulation import SimulatedRound, simulate_round
from secure_fl.transport.tasks import SyntheticTask, TaskResult
from secure_fl.transport.tensors import Tensors

SEED = 11
REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Federation:
    """A provisioned federation directory plus the processes started from it."""

    def __init__(
        self,
        root: Path,
        sites: list[str],
        *,
        protocol: str = "secagg+",
        rounds: int = 2,
        shapes: list[list[int]] | None = None,
        aggregation: Mapping[str, Any] | None = None,
        deadlines: Mapping[str, float] | None = None,
        limits: Mapping[str, int | float] | None = None,
        task_options: Mapping[str, Any] | None = None,
        seed: int = SEED,
    ) -> None:
        self.root = root
        self.names = sites
        self.seed = seed
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # name -> (step, round id): sites started with the test-only crash hook.
        self.crashes: dict[str, tuple[str, int]] = {}
        self.logs = root / "logs"
        agg = dict(aggregation or {})
        # Provision writes the same settings into the server config and every site's policy.
        done = provision(
            root,
            sites,
            rounds=rounds,
            protocol=protocol,
            listen="127.0.0.1:0",
            ckks=False,
            active=bool(agg.get("active", True)),
            corrupt_fraction=float(agg.get("corrupt_fraction", 0.0)),
            dropout_rate=float(agg.get("dropout_rate", 0.1)),
            model_shapes=shapes or [[6, 5], [7]],
        )
        self.server_config = done.server_config
        self.site_configs = done.site_configs
        self.ids = {name: i for i, name in enumerate(sites, start=1)}
        server = json.loads(self.server_config.read_text())
        server["insecure_test_seed"] = seed
        server["aggregation"].update(agg)
        server["deadlines"] = {
            "wait_for_sites_s": 60.0,
            "update_s": 60.0,
            "phase_s": 30.0,
            "liveness_s": 60.0,
            "poll_wait_s": 2.0,
            "linger_s": 5.0,
            **(deadlines or {}),
        }
        server["limits"] = dict(limits or {})
        self.server_config.write_text(json.dumps(server, indent=1))
        self.task_options = {"seed": seed, **(task_options or {})}
        for name in sites:
            self.patch_site(
                name,
                insecure_test_seed=seed,
                reconnect_timeout_s=60.0,
                task={"kind": "synthetic", "options": self.task_options},
                limits=dict(limits or {}),
            )
        self.logs.mkdir(exist_ok=True)
        self.address = ""

    # -- configs ------------------------------------------------------------------------------

    def patch_site(self, name: str, **values: Any) -> None:
        """Set (or, with None, remove) keys of a site's config. ``test_crash_before`` /
        ``test_crash_round`` are not config keys: they choose the test-only launcher
        (``crashing_site.py``, an injected crash hook) for the site's next start."""
        step = values.pop("test_crash_before", "keep")
        crash_round = values.pop("test_crash_round", None)
        if step is None:
            self.crashes.pop(name, None)
        elif step != "keep":
            self.crashes[name] = (step, -1 if crash_round is None else int(crash_round))
        path = self.site_configs[name]
        config = json.loads(path.read_text())
        for key, value in values.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config, indent=1))

    def patch_server(self, **values: Any) -> None:
        config = json.loads(self.server_config.read_text())
        config.update(values)
        self.server_config.write_text(json.dumps(config, indent=1))

    @property
    def state_dir(self) -> Path:
        return self.server_config.parent / "state"

    def site_dir(self, name: str) -> Path:
        return self.site_configs[name].parent

    # -- processes ----------------------------------------------------------------------------

    def _spawn(
        self, key: str, args: list[str], command: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{key}.log", "ab")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "secure_fl.transport.cli"]), *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        self.procs[key] = proc
        return proc

    def start_server(self, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        endpoint = self.state_dir / "endpoint.json"
        endpoint.unlink(missing_ok=True)
        proc = self._spawn("server", ["server", str(self.server_config)])

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_text('server')}")
            return endpoint.exists() and endpoint.stat().st_size > 0

        wait_until(ready, timeout, "the server's endpoint file")
        self.address = json.loads(endpoint.read_text())["address"]
        for name in self.names:
            self.patch_site(name, server=self.address)
        return proc

    def start_site(self, name: str) -> subprocess.Popen[bytes]:
        crash = self.crashes.get(name)
        if crash is not None:
            launcher = [sys.executable, str(Path(__file__).with_name("crashing_site.py"))]
            args = [str(self.site_configs[name]), crash[0], str(crash[1])]
            return self._spawn(name, args, launcher)
        return self._spawn(name, ["site", str(self.site_configs[name])])

    def start_all(self) -> None:
        self.start_server()
        for name in self.names:
            self.start_site(name)

    def wait(self, key: str, timeout: float) -> int:
        try:
            return self.procs[key].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{key} did not exit within {timeout} s\n{self.all_logs()}"
            ) from None

    def wait_all(self, timeout: float = 90.0, sites: list[str] | None = None) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {"server": self.wait("server", timeout)}
        for name in sites if sites is not None else self.names:
            codes[name] = self.wait(name, max(1.0, deadline - time.monotonic()))
        return codes

    def kill(self, key: str) -> None:
        proc = self.procs.get(key)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def kill_all(self) -> None:
        for key in list(self.procs):
            self.kill(key)

    def log_text(self, key: str) -> str:
        path = self.logs / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(f"--- {k} ---\n{self.log_text(k)[-6000:]}" for k in self.procs)

    # -- results ------------------------------------------------------------------------------

    def round_record(self, index: int) -> dict[str, Any]:
        """The record of federation round ``index`` (its protocol round id is ``round_id``)."""
        path = self.state_dir / "rounds" / f"round-{index:06d}.json"
        return json.loads(path.read_text())

    def round_ids(self, rounds: int) -> list[int]:
        """The protocol round ids the server used for federation rounds 0 .. rounds-1 (fresh
        for every attempt, so a retried round has a larger id than its index)."""
        return [int(self.round_record(r)["round_id"]) for r in range(rounds)]

    def checkpoint(self) -> dict[str, Any] | None:
        path = self.state_dir / "checkpoint.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None

    def tasks(self) -> dict[int, SyntheticTask]:
        options = {k: v for k, v in self.task_options.items() if k != "delay_s"}
        return {self.ids[n]: SyntheticTask(n, **options) for n in self.names}

    def simulate(
        self,
        rounds: int,
        *,
        dropouts: Mapping[int, Mapping[int, Phase]] | None = None,
        extra: Mapping[int, Mapping[int, TaskResult]] | None = None,
        signing_keys: Mapping[int, Any] | None = None,
        sites: list[str] | None = None,
    ) -> list[SimulatedRound]:
        """The in-process reference of ``rounds`` rounds: every site reports its update, with
        ``dropouts[round]`` and ``extra[round]`` (results of parties that are not real sites).
        Each round runs under the protocol round id the server used (from its records); tasks
        see the round's index.
        ``signing_keys`` defaults to fresh keys (the active variant; keys do not enter the sum)."""
        config = load_server_config(self.server_config)
        model: Tensors = initial_model(config.model)
        tasks = self.tasks()
        if sites is not None:
            tasks = {self.ids[n]: tasks[self.ids[n]] for n in sites}
        if signing_keys is None and config.aggregation.active:
            signing_keys = {self.ids[n]: SigningKey.generate() for n in self.names}
        out = []
        for r, round_id in enumerate(self.round_ids(rounds)):
            results = {s: t.compute_update(model, r) for s, t in tasks.items()}
            results.update((extra or {}).get(r, {}))
            sim = simulate_round(
                model,
                results,
                config.aggregation,
                round_id,
                test_seed=self.seed,
                dropouts=(dropouts or {}).get(r),
                signing_keys=signing_keys,
            )
            out.append(sim)
            model = sim.model
        return out


def assert_matches(fed: Federation, expected: list[SimulatedRound]) -> None:
    """Each round's modular sum, survivors and new model equal the in-process reference."""
    for r, sim in enumerate(expected):
        record = fed.round_record(r)
        assert record["completed"], record
        assert record["survivors"] == sorted(sim.survivors)
        assert record["threshold"] == sim.config.threshold
        assert record["sum_sha256"] == vector_sha256(sim.total), f"round {r}: sums differ"
        assert record["model_sha256"] == model_blob(sim.model)[1], f"round {r}: models differ"


def secure_channel(fed: Federation, cert: bytes, key: bytes) -> grpc.Channel:
    ca = (fed.root / "ca" / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(
        fed.address,
        creds,
        options=[("grpc.ssl_target_name_override", "secure-fl-server")],
    )


def site_channel(fed: Federation, name: str) -> grpc.Channel:
    d = fed.site_dir(name)
    return secure_channel(fed, (d / "site.crt").read_bytes(), (d / "site.key").read_bytes())


def zeros_like_model(fed: Federation) -> Tensors:
    return {
        k: np.zeros_like(v)
        for k, v in initial_model(load_server_config(fed.server_config).model).items()
    }
