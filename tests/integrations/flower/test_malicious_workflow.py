"""A malicious Flower server against honest sites running secure_fl_mod, through Flower messages.

The server here is SecureAggregationWorkflow driving a LocalGrid whose ``deliver`` rewrites the
round layer's frames on their way to the sites, as a malicious ServerApp (or SuperLink) can: the
overlap attack (a survivor also named dropped, so that its self-mask seed and its mask key are
both revealed), the split view (some sites told the target dropped, others that it survived),
a downgrade of the announced protocol or threshold. Whatever it does, the shares it collects never
let it remove the target's masks: it gets fewer than ``t`` shares of the target's mask key, or
none of its self-mask seed, and the sites leave with a one-line reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Message  # noqa: E402
from server_helpers import local_grid, provision, write_updates  # noqa: E402

from secure_fl.errors import ProtocolError  # noqa: E402
from secure_fl.integrations.flower import records  # noqa: E402
from secure_fl.integrations.flower.grid import LocalGrid  # noqa: E402
from secure_fl.integrations.flower.workflow import SecureAggregationWorkflow  # noqa: E402
from secure_fl.rounds import codec  # noqa: E402
from secure_fl.rounds.messages import SecAggSetup  # noqa: E402
from secure_fl.rounds.spec import AggregationSpec  # noqa: E402
from secure_fl.secagg.messages import UnmaskRequest, UnmaskResponse  # noqa: E402

N = 6
TARGET = 1
WEIGHTS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
LAYOUT = records.Layout(("update",), ((8,),), ("<f8",))

#: (site id, decoded server message) -> the message to deliver instead (or the same).
Rewrite = Callable[[int, Any], Any]


class LyingGrid(LocalGrid):
    """Rewrites every server frame with ``rewrite`` and records what the sites answered."""

    rewrite: Rewrite
    site_of: dict[int, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[tuple[int, Any]] = []  # (site, decoded reply frame)
        self.left: dict[int, str] = {}

    def deliver(self, message: Message, context: Context) -> Message | None:
        site = int(context.node_config["partition-id"]) + 1
        env = records.read(message.content)
        if env is not None and env.frame is not None:
            forged = type(self).rewrite(site, codec.decode(env.frame))
            message.content[records.KEY] = records.to_record(
                dataclasses.replace(env, frame=codec.encode(forged))
            )
        reply = super().deliver(message, context)
        if reply is not None and not reply.has_error():
            got = records.read(reply.content)
            if got is not None and got.left is not None:
                self.left[site] = got.left
            if got is not None and got.frame is not None:
                self.answers.append((site, codec.decode(got.frame)))
        return reply


def _run(tmp_path: Path, rewrite: Rewrite, protocol: str = "secagg", **options: Any) -> LyingGrid:
    spec = AggregationSpec.from_options(protocol, {"threshold": 4, **options})
    fed = provision(spec, tmp_path, N)
    rng = np.random.default_rng(5)
    folders = write_updates(tmp_path, [rng.normal(size=8) for _ in range(N)], WEIGHTS)
    LyingGrid.rewrite = staticmethod(rewrite)
    grid = local_grid(fed, folders, protocol=protocol, grid_class=LyingGrid)
    assert isinstance(grid, LyingGrid)
    workflow = SecureAggregationWorkflow(spec, fed.roster, stage_timeout_s=5.0)
    # The round aborting is one acceptable end; what leaked is checked by the caller.
    with contextlib.suppress(ProtocolError):
        workflow.run_round(grid, arrays=None, layout=LAYOUT)
    return grid


def _shares_of(grid: LyingGrid, owner: int) -> tuple[int, int]:
    """How many shares of ``owner``'s self-mask seed and of its mask key the server got."""
    seeds = keys = 0
    for _, reply in grid.answers:
        if isinstance(reply, UnmaskResponse):
            seeds += sum(1 for o, _, _ in reply.self_mask_shares if o == owner)
            keys += sum(1 for o, _, _ in reply.mask_key_shares if o == owner)
    return seeds, keys


def _overlap(site: int, message: Any) -> Any:
    if isinstance(message, UnmaskRequest):
        return dataclasses.replace(message, dropped=message.dropped | {TARGET})
    return message


def _split(site: int, message: Any) -> Any:
    # Sites 2-3 are told the target dropped (reveal its mask key), 4-6 that it survived (reveal
    # its self-mask seed): with t shares of each the server could strip the target's masks.
    if isinstance(message, UnmaskRequest) and site in (2, 3, 4):
        return dataclasses.replace(
            message, survivors=message.survivors - {TARGET}, dropped=message.dropped | {TARGET}
        )
    return message


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_the_overlap_attack_through_flower_messages_reveals_nothing(
    tmp_path: Path, protocol: str
) -> None:
    grid = _run(tmp_path, _overlap, protocol)
    _, keys = _shares_of(grid, TARGET)
    assert keys == 0, "a site revealed its share of a survivor's mask key"
    assert not [s for s, r in grid.answers if isinstance(r, UnmaskResponse)]
    assert set(grid.left) >= {2, 3, 4, 5, 6}
    assert all("\n" not in reason and "Traceback" not in reason for reason in grid.left.values())


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_a_split_view_of_the_survivors_never_gives_both_secrets(
    tmp_path: Path, protocol: str
) -> None:
    grid = _run(tmp_path, _split, protocol)
    seeds, keys = _shares_of(grid, TARGET)
    t = 4
    assert seeds < t or keys < t, f"server holds {seeds} seed and {keys} key shares of site 1"
    assert keys == 0  # the sites shown the forged set refuse it: its signatures do not match
    assert {2, 3, 4} <= set(grid.left)


@pytest.mark.parametrize(
    ("field", "value"),
    [("protocol", "plain-as-secagg"), ("threshold", 2), ("active", False)],
)
def test_a_downgraded_setup_is_refused_before_anything_is_sent(
    tmp_path: Path, field: str, value: Any
) -> None:
    def downgrade(site: int, message: Any) -> Any:
        if isinstance(message, SecAggSetup):
            if field == "protocol":
                return dataclasses.replace(message, protocol="secagg+", k=2)
            return dataclasses.replace(message, **{field: value})
        return message

    grid = _run(tmp_path, downgrade)
    assert grid.answers == []  # no key advertisement, no share, no masked input left any site
    assert set(grid.left) == set(range(1, N + 1))
