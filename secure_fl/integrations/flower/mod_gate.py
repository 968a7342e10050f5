"""What the secure_fl mod (:mod:`.mod`) does with a message WITHOUT its ``"secure_fl"`` record
(split from it to keep each module under 400 lines).

Guarantee (against a malicious server): no array leaves a secure_fl node outside a secure_fl
round. A ``train`` message (message type ``"train"`` or ``"train.<action>"``) without the record
is refused with an Error reply naming the reason: the user's train function does not run (its
reply, the trained arrays, would otherwise leave in the clear, past SecAgg, the site's policy,
the train cap and the release guard). A message of another category (``evaluate``, ``query``)
runs, but a reply that holds any ArrayRecord is replaced by an Error reply; a reply with only
metrics or configs (e.g. an evaluation score) passes. Never raises itself (the user's function
may).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

log = logging.getLogger("secure_fl.integrations.flower")


def category(msg: Message) -> str:
    """The message type's category (``"train"`` of ``"train"`` and ``"train.<action>"``)."""
    return str(msg.metadata.message_type or "").split(".", 1)[0]


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("secure_fl mod refuses a %s message: %s", msg.metadata.message_type, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def without_envelope(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The reply to ``msg``, which holds no ``"secure_fl"`` record (see the module docstring):
    an Error for a ``train`` message (``call_next`` is not called) or for a reply holding
    arrays; else the reply of ``call_next``."""
    kind = category(msg)
    if kind == "train":
        return _refuse(
            msg,
            "PolicyError: a train message without the secure_fl record is refused (the "
            "trained arrays leave a secure_fl node only inside a secure_fl round)",
        )
    reply = call_next(msg, context)
    if not reply.has_error() and reply.content.array_records:
        return _refuse(
            msg,
            f"PolicyError: the reply to a {kind} message holds arrays; a secure_fl node sends "
            "arrays only inside a secure_fl round",
        )
    return reply


__all__ = ["category", "without_envelope"]
