"""The plain round's server half against a site that ignores the plan's L2 bound (round-4
finding D2): an upload above ``l2_clip`` is refused, a non-finite mean is never an outcome."""

from __future__ import annotations

import numpy as np
import pytest

from secure_fl.errors import RemoteProtocolError, ThresholdError
from secure_fl.rounds.messages import PlainUpload
from secure_fl.rounds.plain import L2_SLACK, PlainServerRound
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.spec import AggregationSpec

RID = 77


def _server(l2_clip: float | None, n: int = 3, length: int = 4) -> PlainServerRound:
    options = {} if l2_clip is None else {"l2_clip": l2_clip}
    spec = AggregationSpec.from_options("plain", options)
    plan = plan_round(spec, dict.fromkeys(range(1, n + 1), 1.0), vector_length=length, round_id=RID)
    server = PlainServerRound(plan)
    server.setup()
    return server


def test_an_upload_above_the_plans_l2_clip_is_refused_and_the_round_goes_on() -> None:
    server = _server(1.0)
    huge = PlainUpload(RID, 1, np.full(4, 1.7e308), False)  # overflowed the mean before the fix
    with pytest.raises(RemoteProtocolError, match="l2_clip"):
        server.receive(1, huge)
    slightly = PlainUpload(RID, 2, np.full(4, 0.5 * (1 + 1e-6)), False)  # norm 1 + 1e-6
    with pytest.raises(RemoteProtocolError, match="L2 norm"):
        server.receive(2, slightly)
    at_bound = np.full(4, 0.5) * (1 + 0.5 * L2_SLACK)  # within the slack: the site's rounding
    server.receive(2, PlainUpload(RID, 2, at_bound, True))
    server.receive(3, PlainUpload(RID, 3, np.full(4, 0.1), False))
    assert server.expected == frozenset({1})
    server.close()
    outcome = server.outcome()
    assert outcome.survivors == frozenset({2, 3}) and outcome.dropped == frozenset({1})
    assert outcome.mean is not None and np.all(np.isfinite(outcome.mean))
    np.testing.assert_allclose(outcome.mean, (at_bound + 0.1) / 2)


def test_without_l2_clip_a_large_finite_upload_is_taken_but_an_overflowing_mean_is_not() -> None:
    server = _server(None)
    for site in (1, 2):
        server.receive(site, PlainUpload(RID, site, np.full(4, 1.7e308), False))
    with pytest.raises(ThresholdError, match="not finite"):
        server.close()
    assert not server.done
