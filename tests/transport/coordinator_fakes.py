"""A fake host, clock and sites for driving the server's coordinator without sockets."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import Message

from secure_fl.secagg import SecAggClient, ServerPhase
from secure_fl.secagg.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedInput,
    RevealNonce,
    ShareKeys,
    UnmaskResponse,
)
from secure_fl.secagg.policy import SitePolicy
from secure_fl.transport import checkpoint as ckpt
from secure_fl.transport import convert, rounds, tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import (
    AggregationSettings,
    Deadlines,
    RosterEntry,
    ServerConfig,
    TlsFiles,
)
from secure_fl.transport.coordinator import Attempt, Coordinator, ModelView, drive


class Clock:
    """Fake time: only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class RecordingLog:
    """An EventLog stand-in that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.events.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._add("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, fields)

    def error(self, event: str, exc: bool = False, **fields: Any) -> None:
        self._add("error", event, fields)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.events if e == event]


class FakeHost:
    """The coordinator's host in memory: round ids, model, checkpoints, records."""

    def __init__(self, clock: Clock, model: tensors.Tensors) -> None:
        self.coord: Coordinator | None = None
        self._clock = clock
        self.next_id = 0
        self.checkpoints: list[ckpt.Checkpoint] = []
        self.records: dict[str, dict[str, Any]] = {}
        self.set_model(model)

    def new_round_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def post(self, attempt: Attempt, site: int, kind: str, message: Message) -> None:
        assert self.coord is not None
        self.coord.queue(attempt, site, kind, message)

    def model_view(self) -> ModelView:
        return ModelView(self.model, self.digest, len(self.blob), False, ())

    def set_model(self, model: tensors.Tensors) -> None:
        self.model = dict(model)
        self.blob = tensors.dumps(self.model)
        self.digest = hashlib.sha256(self.blob).digest()

    def set_encrypted_model(self, blob: bytes) -> None:
        raise AssertionError("no CKKS here")

    def save_checkpoint(self, checkpoint: ckpt.Checkpoint, blob: bytes | None) -> None:
        self.checkpoints.append(checkpoint)

    def save_round_record(self, name: str, record: Mapping[str, Any]) -> None:
        self.records[name] = dict(record)

    def clock(self) -> float:
        return self._clock()


NAMES = ("a", "b", "c", "d")
MODEL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def make_config(
    protocol: str = "plain",
    *,
    n: int = 4,
    rounds: int = 1,
    min_sites: int = 2,
    max_attempts: int = 3,
    threshold: int | None = None,
    **extra: Any,
) -> ServerConfig:
    roster = tuple(RosterEntry(name, i + 1) for i, name in enumerate(NAMES[:n]))
    tls = TlsFiles(Path("ca.pem"), Path("server.pem"), Path("server.key"))
    return ServerConfig(
        federation="fed",
        listen="127.0.0.1:0",
        tls=tls,
        roster=roster,
        state_dir=Path("state"),
        rounds=rounds,
        aggregation=AggregationSettings(
            protocol=protocol, active=False, threshold=threshold, dropout_rate=0.25
        ),
        deadlines=Deadlines(
            wait_for_sites_s=30, update_s=60, phase_s=10, liveness_s=1e6, heartbeat_s=30
        ),
        min_sites=min_sites,
        max_attempts=max_attempts,
        **extra,
    )


@dataclasses.dataclass
class Harness:
    coord: Coordinator
    host: FakeHost
    clock: Clock
    log: RecordingLog

    def tick(self, seconds: float = 0.0) -> None:
        drive(self.coord, self.clock.advance(seconds))

    def join(self, *sites: int) -> None:
        for s in sites:
            self.coord.join(s, self.clock())

    def next(self, site: int) -> pb.Instruction | None:
        """The site's newest queued instruction (what its next poll would end with)."""
        queue = self.coord.sites[site].queue
        return queue[-1] if queue else None

    def attempt(self) -> Attempt:
        """The running attempt (there must be one)."""
        rs = self.coord.current
        assert rs is not None
        return rs

    def inst(self, site: int) -> pb.Instruction:
        """The site's newest instruction (there must be one)."""
        inst = self.next(site)
        assert inst is not None
        return inst


def harness(config: ServerConfig, **kwargs: Any) -> Harness:
    clock = Clock()
    host = FakeHost(clock, MODEL)
    log = RecordingLog()
    coord = Coordinator(config, host, log, **kwargs)  # type: ignore[arg-type]
    host.coord = coord
    return Harness(coord, host, clock, log)


def plain_update(value: float) -> tensors.Tensors:
    return {k: np.full(v.shape, value, dtype=np.float32) for k, v in MODEL.items()}


PHASES = {
    AdvertiseKeys: ServerPhase.COLLECT_KEYS,
    RevealNonce: ServerPhase.COLLECT_REVEALS,
    ShareKeys: ServerPhase.COLLECT_SHARES,
    MaskedInput: ServerPhase.COLLECT_MASKED,
    ConsistencySignature: ServerPhase.COLLECT_SIGNATURES,
    UnmaskResponse: ServerPhase.COLLECT_UNMASK,
}
FROM_PB: dict[str, Any] = {
    "key_roster": convert.roster_from_pb,
    "reveal_set": convert.reveal_set_from_pb,
    "share_delivery": convert.delivery_from_pb,
    "consistency_request": convert.consistency_from_pb,
    "unmask_request": convert.unmask_request_from_pb,
}


class SecAggSite:
    """An honest SecAgg site speaking to the coordinator directly (no bytes, no sockets)."""

    def __init__(self, h: Harness, site: int, value: float) -> None:
        self.h, self.site, self.value = h, site, value
        self.client: SecAggClient | None = None
        self.seen = 0

    def send(self, message: Any) -> None:
        phase = PHASES[type(message)]
        self.h.coord.secagg_message(
            self.site, phase, message, type(message).__name__, self.h.clock()
        )

    def step(self) -> bool:
        """Answer every instruction queued since the last step. Returns whether it sent."""
        sent = False
        queue = self.h.coord.sites[self.site].queue
        while self.seen < len(queue):
            inst = queue[self.seen]
            self.seen += 1
            kind = inst.WhichOneof("kind")
            if kind == "secagg_setup":
                config, _ = convert.setup_from_pb(
                    inst.secagg_setup, inst.round_id, max_length=10**6
                )
                size = config.vector_length
                dtype = np.uint32 if config.bits <= 32 else np.uint64
                vector = np.full(size, int(self.value), dtype=dtype)
                self.client = SecAggClient(
                    self.site,
                    config,
                    input_vector=vector,
                    policy=SitePolicy(require_active=False),
                )
                self.send(self.client.start())
                sent = True
            elif kind in FROM_PB and self.client is not None:
                reply = self.client.handle(FROM_PB[kind](getattr(inst, kind)))
                if reply is not None:
                    self.send(reply)
                    sent = True
        return sent


def model_size() -> int:
    return rounds.model_size(MODEL)
