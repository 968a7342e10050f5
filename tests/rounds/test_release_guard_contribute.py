"""The release guard hears of the masked input before it leaves (issue 11, b1): the other sites'
shares rebuild a site's self-mask, so its masked input alone puts its update into a sum; a host
with a per-release budget refuses there, and the masked input is discarded."""

from __future__ import annotations

import pytest
from rounds_helpers import make_round

from secure_fl.errors import PolicyError
from secure_fl.rounds.guards import MemoryReleaseGuard
from secure_fl.rounds.local import run_local


class _Spent(MemoryReleaseGuard):
    def contribute(self, round_id: int) -> None:
        raise PolicyError(f"no release left for round {round_id}")


def test_every_site_records_its_masked_input_before_it_leaves() -> None:
    r = make_round("secagg", 4, 16, seed=21, dropout_rate=0.0)
    guards = {i: MemoryReleaseGuard() for i in r.plan.ids}
    run_local(r.plan, r.updates, signing_keys=r.keys, release_guards=guards)
    assert all(g.contributed == frozenset({r.plan.round_id}) for g in guards.values())


def test_a_guard_that_refuses_the_masked_input_stops_it() -> None:
    r = make_round("secagg", 4, 16, seed=22, dropout_rate=0.0)
    guards = {i: MemoryReleaseGuard() for i in r.plan.ids}
    guards[1] = _Spent()
    with pytest.raises(PolicyError, match="no release left"):
        run_local(r.plan, r.updates, signing_keys=r.keys, release_guards=guards)
    assert guards[1].contributed == frozenset()
