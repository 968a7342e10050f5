"""An in-process Flower ``Grid`` over a ``ClientApp``: fast tests of the ServerApp workflow.

:class:`LocalGrid` runs the ClientApp in this process, one ``Context`` per node (its
``node_config``, and a ``state`` kept between messages as a SuperNode keeps it), synchronously
when messages are pushed. Like a SuperLink it authenticates the sender: a reply's
``src_node_id`` is always the node the instruction was sent to, whatever the app wrote, and a
ClientApp that raises yields an error reply (``Message(Error(...), reply_to=...)``), never an
exception in the ServerApp. Tests that need a misbehaving network override :meth:`deliver`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from secure_fl.errors import ConfigError

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.supercore.run import Run

#: The ServerApp's node id in Flower (``flwr.common.constant.SUPERLINK_NODE_ID``).
SERVER_NODE_ID = 1
#: Flower's error code for a ClientApp that raised (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``).
CLIENT_APP_RAISED_EXCEPTION = 2


def _random_id(bits: int) -> int:
    return max(2, int.from_bytes(os.urandom(8), "big") >> (64 - bits))


class LocalGrid(Grid):
    """A Grid of ``num_nodes`` in-process nodes running ``client_app``.

    Node ``i`` (0-based) has a random node id and ``node_config`` ``{"partition-id": i,
    "num-partitions": num_nodes}`` updated with ``node_config(i)`` when given (e.g.
    ``{"secure-fl-site": path}``). :attr:`contexts` maps node id -> its ``Context``.
    Messages run when pushed (no threads); replies wait to be pulled.

    Errors: ConfigError for ``num_nodes`` < 1 or a ``node_config`` that is not a mapping.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        node_config: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ConfigError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
        self.client_app = client_app
        run_id = _random_id(63)
        self._run: Run = Run.create_empty(run_id=run_id)
        # Message() reads the sender's identity from Flower's process-wide TaskIdentity (what
        # run_simulation sets for a ServerApp).
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        self.contexts: dict[int, Context] = {}
        for index in range(num_nodes):
            config: dict[str, Any] = {"partition-id": index, "num-partitions": num_nodes}
            if node_config is not None:
                extra = node_config(index)
                if not isinstance(extra, dict):
                    raise ConfigError(f"node_config({index}) must return a dict")
                config.update(extra)
            node = _random_id(63)
            while node in self.contexts or node == SERVER_NODE_ID:
                node = _random_id(63)
            self.contexts[node] = Context(
                run_id=run_id, node_id=node, node_config=config, state=RecordDict(), run_config={}
            )
        self._replies: dict[str, Message] = {}

    # -- Grid -------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        """Use ``run`` (its id goes into the nodes' contexts)."""
        self._run = run
        for context in self.contexts.values():
            context.run_id = run.run_id

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """``Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)``."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every node's id."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Give each message an id and run it on its node now; its reply waits for
        :meth:`pull_messages`. Errors: ConfigError for a message to an unknown node."""
        ids: list[str] = []
        for message in messages:
            node = int(message.metadata.dst_node_id)
            if node not in self.contexts:
                raise ConfigError(f"no node {node} in this LocalGrid")
            message.metadata.__dict__["_message_id"] = str(uuid4())
            reply = self.deliver(message, self.contexts[node])
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that are there (each returned once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull their replies (every node answers at once, so
        ``timeout`` never needs to elapse; a dropped reply is simply absent)."""
        return list(self.pull_messages(list(self.push_messages(messages))))

    # -- one node ---------------------------------------------------------------------------

    def deliver(self, message: Message, context: Context) -> Message | None:
        """Run the ClientApp on ``message`` at the node of ``context``; its reply, sent by that
        node (``src_node_id`` and ``reply_to`` forced, as a SuperLink does), an error reply when
        the app raised. Override to lose, delay or alter replies in tests (None: no reply)."""
        from flwr.app import Error

        try:
            reply = self.client_app(message, context)
        except Exception as exc:  # a node's failure is a message, never the server's exception
            reason = (
                f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
            )
            return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        meta = reply.metadata.__dict__
        meta["_src_node_id"] = context.node_id
        meta["_dst_node_id"] = message.metadata.src_node_id
        meta["_reply_to_message_id"] = message.metadata.message_id
        return reply


__all__ = ["LocalGrid"]
