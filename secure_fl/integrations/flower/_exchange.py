"""One round's message exchange over a Flower ``Grid`` (the workflow's carrier, split from
:mod:`.workflow` to keep both short).

:class:`Exchange` sends one stage's messages and takes each reply only when it is the reply of
the node the round maps to that site (``reply.metadata.src_node_id``, authenticated by the
Grid), to the message sent to that node in this stage, with the round's id, the stage and that
site id in its envelope. A refused, error, ``left`` or missing reply makes the site leave the
round (:attr:`Exchange.gone`): it is sent nothing more. A frame that the codec or the server
half refuses (RemoteProtocolError) is dropped and the round goes on (the h11 split); any other
ProtocolError from the server half propagates (the round aborts).

A train-stage claim of a site id whose roster entry has a verify key (active variant) counts
only with its proof: the site's Ed25519 signature over :func:`~.records.claim_message` (round
id, site id, the node the claim came from); an unproven claim is ignored (logged), so a node
cannot get an honest site excluded by claiming its id. Without a verify key every claim counts
(two claims of one id exclude both, in :mod:`.workflow`). The user's public metrics of a site
are read from its reply that carries its masked input or upload (:attr:`Exchange.metrics`).

:func:`screen_weights` refuses, before the round is planned, a reported weight above the
workflow's ``max_weight`` and one whose share the round layer's own normalisation
(:func:`~secure_fl.rounds.plan.normalise_weights`) rounds to 0, so that one site's weight cannot
make the plan fail for everyone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from secure_fl.errors import ConfigError, RemoteProtocolError, SignatureError
from secure_fl.integrations.flower import records
from secure_fl.rounds import codec
from secure_fl.rounds.plan import normalise_weights

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp import Grid

    from secure_fl.rounds.base import ServerRound
    from secure_fl.rounds.messages import Message as RoundMessage

log = logging.getLogger("secure_fl.integrations.flower")

#: The message type of every secure_fl message (the ClientApp's train function sees it).
MESSAGE_TYPE = "train"

#: (node id, reported weight) of one train-stage claim.
Claim = tuple[int, float]


def array_bytes(arrays: Any) -> int:
    """Bytes of the arrays' data in an ``ArrayRecord`` (payload, not Flower's framing)."""
    return int(sum(len(array.data) for array in arrays.values()))


def public_metrics(reply: Message) -> dict[str, float]:
    """The scalar entries of the reply's ``"metrics"`` MetricRecord (lists are left out)."""
    try:
        metrics = reply.content.metric_records.get("metrics")
    except Exception:
        return {}
    if metrics is None:
        return {}
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def screen_weights(
    weights: Mapping[int, float], max_weight: float | None = None
) -> tuple[dict[int, float], dict[int, str]]:
    """Split the reported ``weights`` (site id -> weight) into those the round is planned with
    and the refused ones (site id -> reason). Refused: a weight that is not a finite number
    > 0 or is above ``max_weight`` (None: no bound), then every weight whose share
    ``w / sum(w)``, in exact rationals rounded once to float as
    :func:`~secure_fl.rounds.plan.normalise_weights` computes it, is 0 (repeated until the rest
    normalise; dropping a site only raises the others' shares). Nothing is clipped: a refused
    site is out of the round.

    Guarantee: the kept weights (when any) pass ``normalise_weights``. A weight >= 1 is never
    refused for underflow (its share is >= 1 / (n * 2**1024) > 2**-1074 for n < 2**50 sites),
    so a huge report excludes no honest site; without ``max_weight`` it weights the mean as it
    likes.
    Errors: none (whatever cannot be planned is refused)."""
    refused: dict[int, str] = {}
    kept: dict[int, float] = {}
    for site in sorted(weights):
        w = weights[site]
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < math.inf:
            refused[site] = f"reported weight {w!r} is not a finite number > 0"
        elif max_weight is not None and w > max_weight:
            refused[site] = f"reported weight {w!r} exceeds max_weight={max_weight!r}"
        else:
            kept[site] = float(w)
    while kept:
        try:
            normalise_weights(kept)
            break
        except ConfigError as exc:
            total = sum((Fraction(w) for w in kept.values()), Fraction(0))
            low = [s for s, w in kept.items() if float(Fraction(w) / total) == 0.0]
            for site in low or list(kept):  # (no other failure is known: refuse them all)
                w = kept.pop(site)
                refused[site] = (
                    f"reported weight {w!r}: its share underflows to 0"
                    if low
                    else (f"reported weight {w!r} cannot be normalised: {exc}")
                )
    return kept, refused


class Exchange:
    """The messages of one round ``round_id`` over ``grid``: each stage waits at most
    ``timeout`` seconds for its replies. ``node_of`` (site id -> node id) is set by :meth:`bind`
    after the train stage; ``gone`` the sites that left; ``bytes_to_sites`` /
    ``bytes_from_sites`` count frames and arrays; ``metrics`` site id -> the public metrics of
    its reply that carried its masked input or upload."""

    def __init__(self, grid: Grid, round_id: int, timeout: float, *, group: str) -> None:
        self.grid = grid
        self.round_id = round_id
        self.timeout = timeout
        self.group = group
        self.node_of: dict[int, int] = {}
        self.gone: set[int] = set()
        self.bytes_to_sites = 0
        self.bytes_from_sites = 0
        self.site_bytes: dict[int, int] = {}
        self.metrics: dict[int, dict[str, float]] = {}

    def _message(self, node: int, envelope: records.Envelope, extra: Mapping[str, Any]) -> Message:
        from flwr.app import Message, RecordDict

        content = RecordDict({records.KEY: records.to_record(envelope), **extra})
        return Message(content, dst_node_id=node, message_type=MESSAGE_TYPE, group_id=self.group)

    def _send(self, sent: dict[int, Message]) -> list[Message]:
        if not sent:
            return []
        return list(self.grid.send_and_receive(list(sent.values()), timeout=self.timeout))

    def _envelope(self, reply: Message, sent: Mapping[int, Message], stage: str) -> Any:
        """The checked envelope of ``reply`` as ``(node, Envelope)``, or a reason (str)."""
        node = int(reply.metadata.src_node_id)
        ours = sent.get(node)
        if ours is None:
            return f"a reply from node {node}, to which this stage sent nothing"
        wanted = ours.metadata.message_id
        if wanted and reply.metadata.reply_to_message_id != wanted:
            return f"node {node}: a reply to another message"
        if reply.has_error():
            reason = (reply.error.reason or "").strip().splitlines()
            first = reason[0][:200] if reason else ""
            return f"node {node}: error reply ({reply.error.code}: {first})"
        try:
            env = records.read(reply.content)
        except RemoteProtocolError as exc:
            return f"node {node}: {exc}"
        if env is None:
            return f"node {node}: a reply without the {records.KEY} record"
        if env.stage != stage or env.round_id != self.round_id:
            return f"node {node}: a reply of stage {env.stage!r} and another round id"
        if env.left is not None:
            return f"node {node}: left the round ({env.left})"
        if env.frame is not None:
            self.bytes_from_sites += len(env.frame)
        return node, env

    def train(
        self,
        nodes: Iterable[int],
        user: Mapping[str, Any],
        verify_keys: Mapping[int, bytes | None] | None = None,
    ) -> dict[int, list[Claim]]:
        """The train stage: ``user`` records (``arrays``, ``config``) to every node; returns
        site id -> the claims of that id (a list: two nodes may claim one id). A claim of a site
        id with a verify key in ``verify_keys`` counts only with a valid proof (module
        docstring); an unproven one is ignored."""
        sent = {
            int(n): self._message(int(n), records.Envelope("train", self.round_id), user)
            for n in nodes
        }
        claims: dict[int, list[Claim]] = {}
        answered: set[int] = set()
        for reply in self._send(sent):
            checked = self._envelope(reply, sent, "train")
            if isinstance(checked, str):
                log.warning("train stage: refused %s", checked)
                continue
            node, env = checked
            if node in answered:
                log.warning("train stage: refused a second reply from node %d", node)
                continue
            answered.add(node)
            if env.site_id is None or env.weight is None:
                log.warning("train stage: node %d sent no site id or weight", node)
                continue
            key = (verify_keys or {}).get(env.site_id)
            if key is not None and not self._proven(key, env, node):
                log.warning(
                    "train stage: ignored node %d's unproven claim of site %d", node, env.site_id
                )
                continue
            claims.setdefault(env.site_id, []).append((node, env.weight))
        return claims

    def _proven(self, key: bytes, env: records.Envelope, node: int) -> bool:
        """Whether ``env.proof`` is the signature under ``key`` of the claim of ``env.site_id``
        in this round by ``node``."""
        from secure_fl.crypto.signing import verify

        if env.proof is None or env.site_id is None:
            return False
        try:
            verify(key, env.proof, records.claim_message(self.round_id, env.site_id, node))
        except SignatureError:
            return False
        return True

    def bind(self, node_of: Mapping[int, int]) -> None:
        """Fix the round's map site id -> node id (the train stage's unique claims)."""
        self.node_of = dict(node_of)

    def stage(
        self, name: str, messages: Mapping[int, RoundMessage], server: ServerRound | None
    ) -> None:
        """Send each site still in the round its message of stage ``name`` and hand each
        accepted reply's frame to ``server`` (None: replies carry no frame, e.g. ``result``)."""
        site_of: dict[int, int] = {}
        sent: dict[int, Message] = {}
        for site in sorted(messages):
            node = self.node_of.get(site)
            if node is None or site in self.gone:
                continue
            frame = codec.encode(messages[site])
            self.bytes_to_sites += len(frame)
            sent[node] = self._message(node, records.Envelope(name, self.round_id, frame), {})
            site_of[node] = site
        answered: set[int] = set()
        for reply in self._send(sent):
            checked = self._envelope(reply, sent, name)
            sender = int(reply.metadata.src_node_id)
            owner = site_of.get(sender)
            if owner is None:
                log.warning("%s stage: refused %s", name, checked)
                continue
            if isinstance(checked, str) or sender in answered:
                reason = checked if isinstance(checked, str) else f"node {sender}: a second reply"
                log.warning("%s stage: site %d leaves the round: %s", name, owner, reason)
                self.gone.add(owner)
                answered.add(sender)
                continue
            answered.add(sender)
            _, env = checked
            if env.site_id != owner:
                log.warning(
                    "%s stage: node %d claimed site %s, not %d", name, sender, env.site_id, owner
                )
                self.gone.add(owner)
                continue
            released = public_metrics(reply)
            if released:
                self.metrics[owner] = released
            if env.frame is None or server is None:
                continue
            self.site_bytes[owner] = self.site_bytes.get(owner, 0) + len(env.frame)
            try:
                server.receive(owner, codec.decode(env.frame))
            except RemoteProtocolError as exc:
                log.warning("%s stage: refused a message of site %d: %s", name, owner, exc)
        for node, site in site_of.items():
            if node not in answered:
                log.warning("%s stage: no reply from site %d (node %d)", name, site, node)
                self.gone.add(site)


__all__ = ["MESSAGE_TYPE", "Exchange", "array_bytes", "public_metrics", "screen_weights"]
