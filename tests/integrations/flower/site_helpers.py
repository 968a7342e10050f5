"""Test helpers: drive the secure_fl Flower mod in process (no Ray, no Grid) against the round
layer's server halves (plan_round + make_server_round), as the server workflow would."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from secure_fl.integrations.flower import records
from secure_fl.integrations.flower.mod import make_secure_fl_mod
from secure_fl.integrations.flower.node import NODE_CONFIG_KEY
from secure_fl.integrations.flower.records import Envelope
from secure_fl.rounds import codec
from secure_fl.rounds.base import RoundOutcome, ServerRound
from secure_fl.rounds.local import make_server_round
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.spec import AggregationSpec


def instruction(content: RecordDict, node_id: int) -> Message:
    """A server -> node message of type ``train`` (what a Grid would deliver)."""
    md = Metadata(
        run_id=1,
        message_id=os.urandom(8).hex(),
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    message: Message = Message(content=content, metadata=md)  # type: ignore[call-overload]
    return message


def arrays_of(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


@dataclass
class Node:
    """One Flower node: its Context (persisted between messages, as Flower does), the site JSON
    in its node_config and what its user's train function returns."""

    site_id: int
    node_id: int
    config_path: Path
    trained: dict[str, np.ndarray]
    num_examples: int
    context: Context = field(init=False)
    train_calls: int = 0
    #: What the mod is made with (None: the site JSON of ``node_config``).
    source: Any = None

    def __post_init__(self) -> None:
        self.context = Context(
            run_id=1,
            node_id=self.node_id,
            node_config={NODE_CONFIG_KEY: str(self.config_path)},
            state=RecordDict(),
            run_config={},
        )

    def train(self, msg: Message, context: Context) -> Message:
        self.train_calls += 1
        content = RecordDict(
            {
                "arrays": arrays_of(self.trained),
                "metrics": MetricRecord({"num-examples": self.num_examples, "loss": 0.5}),
            }
        )
        return Message(content, reply_to=msg)

    def call(self, content: RecordDict) -> Message:
        """Deliver ``content`` through the mod (the node's Context persists)."""
        mod = make_secure_fl_mod(self.source)
        return mod(instruction(content, self.node_id), self.context, self.train)


def send(node: Node, stage: str, round_id: int, frame: bytes | None = None) -> Envelope:
    reply = node.call(
        RecordDict({records.KEY: records.to_record(Envelope(stage, round_id, frame))})
    )
    env = records.read(reply.content)
    assert env is not None
    return env


@dataclass
class Driven:
    outcome: RoundOutcome | None
    weights: dict[int, float]
    left: dict[int, str]
    train_replies: dict[int, Message]
    error: BaseException | None = None


def drive_round(
    nodes: list[Node],
    spec: AggregationSpec,
    global_arrays: Mapping[str, np.ndarray] | None,
    *,
    verify_keys: Mapping[int, bytes] | None = None,
    vanish_after: Mapping[int, int] | None = None,
    dp_json: str = "",
    round_id: int | None = None,
    make_server: Callable[[Any], ServerRound] | None = None,
    tamper: Callable[[int, str, Envelope], Envelope] | None = None,
    before: Callable[[Node, str, int], None] | None = None,
) -> Driven:
    """One round as the server workflow runs it. ``vanish_after[site]``: the number of
    secure_fl messages that site answers (train counts 1) before it vanishes; ``before(node,
    stage, n)`` runs before the node's n-th message (not for train)."""
    rid = round_id or int.from_bytes(os.urandom(8), "big") % (records.ROUND_ID_LIMIT - 1) + 1
    by_site = {n.site_id: n for n in nodes}
    answered = dict.fromkeys(by_site, 0)
    left: dict[int, str] = {}
    limit = dict(vanish_after or {})

    def alive(site: int) -> bool:
        return site not in left and answered[site] < limit.get(site, 1 << 30)

    def exchange(site: int, stage: str, frame: bytes | None) -> Envelope | None:
        if not alive(site):
            return None
        answered[site] += 1
        if before is not None:
            before(by_site[site], stage, answered[site])
        env = send(by_site[site], stage, rid, frame)
        if tamper is not None:
            env = tamper(site, stage, env)
        assert env.round_id == rid and env.site_id == site
        if env.left is not None:
            left[site] = env.left
            return None
        return env

    train_replies: dict[int, Message] = {}
    weights: dict[int, float] = {}
    for node in nodes:
        content = RecordDict(
            {records.KEY: records.to_record(Envelope("train", rid)), "config": ConfigRecord({})}
        )
        if global_arrays is not None:
            content["arrays"] = arrays_of(global_arrays)
        answered[node.site_id] += 1
        reply = node.call(content)
        train_replies[node.site_id] = reply
        env = records.read(reply.content)
        assert env is not None
        if env.left is not None:
            left[node.site_id] = env.left
        else:
            assert env.weight is not None
            weights[node.site_id] = env.weight
    length = sum(int(np.asarray(v).size) for v in next(iter(nodes)).trained.values())
    try:
        plan = plan_round(
            spec,
            weights,
            vector_length=length,
            round_id=rid,
            verify_keys=verify_keys,
            extra_binding=dp_json.encode(),
        )
        server = make_server(plan) if make_server is not None else make_server_round(plan)
        stage = "setup"
        out = server.setup()
        while True:
            for site in sorted(out):
                env = exchange(site, stage, codec.encode(out[site]))
                if env is not None and env.frame is not None:
                    try:
                        server.receive(site, codec.decode(env.frame))
                    except Exception as exc:  # refused by the server: the round goes on
                        left.setdefault(site, f"refused by server: {exc}")
            if server.done:
                break
            out = server.close()
            stage = "step"
        return Driven(server.outcome(), weights, left, train_replies)
    except Exception as exc:
        return Driven(None, weights, left, train_replies, error=exc)


def expected_mean(nodes: list[Node], global_arrays: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The weighted mean of the nodes' updates (flattened, keys in order)."""
    total = 0.0
    acc: np.ndarray | None = None
    for n in nodes:
        trained = np.concatenate(
            [np.asarray(v, np.float64).reshape(-1) for v in n.trained.values()]
        )
        if global_arrays is not None:
            base = np.concatenate(
                [np.asarray(v, np.float64).reshape(-1) for v in global_arrays.values()]
            )
            trained = trained - base
        acc = trained * n.num_examples if acc is None else acc + trained * n.num_examples
        total += n.num_examples
    assert acc is not None
    return acc / total
