"""Helpers of the site driver tests: a federation provisioned on disk, a recording log, a task
with a known update, instruction builders and the wire conversions a server would do."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from coordinator_fakes import RecordingLog

from secure_fl.rounds import protobuf
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.secagg import SecAggServerRound
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.secagg import messages as sm
from secure_fl.transport import tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import SiteConfig, load_server_config, load_site_config
from secure_fl.transport.provision import load_signing_key, provision
from secure_fl.transport.rounds import initial_model, sha256
from secure_fl.transport.site_driver import SiteDriver
from secure_fl.transport.site_replies import Call, Upload
from secure_fl.transport.tasks import TaskResult


class FixedTask:
    """Update ``scale * (site_id + 1)`` everywhere, weight ``10 * site_id``; records its calls."""

    def __init__(
        self,
        site_id: int,
        *,
        scale: float = 0.01,
        metrics: Mapping[str, float] | None = None,
        samples: int = 0,
    ) -> None:
        self.site_id, self.scale = site_id, scale
        self.metrics, self.samples = dict(metrics or {}), samples
        self.calls: list[tuple[int, Any]] = []

    def compute_update(
        self, global_model: Mapping[str, np.ndarray], round_id: int, round_config: Any = None
    ) -> TaskResult:
        self.calls.append((round_id, round_config))
        value = self.scale * (self.site_id + 1)
        update = {k: np.full_like(v, value) for k, v in global_model.items()}
        return TaskResult(update, 10.0 * self.site_id, self.metrics, self.samples)


@dataclasses.dataclass
class DriverFed:
    root: Path
    configs: dict[str, SiteConfig]
    model: tensors.Tensors
    blob: bytes

    @property
    def digest(self) -> bytes:
        return sha256(self.blob)

    def fetch(self, digest: bytes) -> bytes:
        if digest != self.digest:
            raise AssertionError("the driver asked for another model")
        return self.blob

    def driver(self, name: str, **kwargs: Any) -> tuple[SiteDriver, RecordingLog]:
        config = self.configs[name]
        config.state_dir.mkdir(parents=True, exist_ok=True)
        log = RecordingLog()
        task = kwargs.pop("task", None) or FixedTask(config.site_id)
        key = load_signing_key(config.signing_key) if config.signing_key is not None else None
        return SiteDriver(config, task=task, log=log, signing_key=key, **kwargs), log


def make_federation(tmp_path: Path, names: list[str], **kwargs: Any) -> DriverFed:
    done = provision(tmp_path / "fed", names, **kwargs)
    configs = {n: load_site_config(p) for n, p in done.site_configs.items()}
    model = initial_model(load_server_config(done.server_config).model)
    return DriverFed(tmp_path / "fed", configs, model, tensors.dumps(model))


def round_start(
    attempt: int, round_id: int, digest: bytes, aggregation: str = "secagg+", **fields: Any
) -> pb.Instruction:
    return pb.Instruction(
        attempt=attempt,
        index=0,
        round_id=round_id,
        round_start=pb.RoundStart(
            aggregation=aggregation, model_sha256=digest, round_index=round_id - 1, **fields
        ),
    )


TO_WIRE: dict[type, tuple[str, Any]] = {
    sm.KeyRoster: ("key_roster", protobuf.roster_to_pb),
    sm.RevealSet: ("reveal_set", protobuf.reveal_set_to_pb),
    sm.ShareDelivery: ("share_delivery", protobuf.delivery_to_pb),
    sm.ConsistencyRequest: ("consistency_request", protobuf.consistency_to_pb),
    sm.UnmaskRequest: ("unmask_request", protobuf.unmask_request_to_pb),
}


def from_wire(reply: Call | Upload, sender: int) -> Any:
    if isinstance(reply, Upload):
        assert reply.rpc == "UploadMaskedInput"
        return protobuf.masked_from_payload(reply.header, bytes(reply.data), sender)
    m: Any = reply.message
    if reply.rpc == "SendAdvertiseKeys":
        return protobuf.advert_from_pb(m, sender)
    if reply.rpc == "SendRevealNonce":
        return protobuf.reveal_from_pb(m, sender)
    if reply.rpc == "SendShareKeys":
        return protobuf.share_keys_from_pb(m, sender, 64)
    if reply.rpc == "SendConsistencySignature":
        return protobuf.signature_from_pb(m, sender)
    assert reply.rpc == "SendUnmaskResponse"
    return protobuf.unmask_from_pb(m, sender, 64)


def secagg_setup(
    fed: DriverFed, round_id: int, ids: list[int], **spec: Any
) -> tuple[SecAggServerRound, dict[int, pb.Instruction]]:
    roster = fed.configs["a"].roster
    keys = {e.site_id: e.verify_key for e in roster if e.site_id in ids and e.verify_key}
    size = sum(int(v.size) for v in fed.model.values())
    plan = plan_round(
        AggregationSpec("secagg+", **spec),
        {s: 10.0 * s for s in ids},
        vector_length=size,
        round_id=round_id,
        verify_keys=keys if spec.get("active", True) else None,
    )
    server = SecAggServerRound(plan)
    instructions = {
        s: pb.Instruction(
            attempt=1, index=1, round_id=round_id, secagg_setup=protobuf.setup_to_pb(m)
        )
        for s, m in server.setup().items()
    }
    return server, instructions
