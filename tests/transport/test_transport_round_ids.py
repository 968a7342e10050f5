"""Fresh round ids per attempt, end to end: a retried round runs under a new id, and a model that
is the result of an earlier round id (not ``round_id - 1``) is still accepted where it must be."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from transport_helpers import Federation, wait_until

pytest.importorskip("tenseal")

from test_transport_ckks import add_ckks, ckks_federation


def test_ckks_round_retried_under_a_fresh_id_decrypts_the_announced_model(
    federation: Callable[..., Federation],
) -> None:
    """CKKS, 3 sites, min_sites 3. Round 0 (id 0) completes: the global model is encrypted, the
    result of round id 0. Site c dies before its upload in round 1 (id 1), so that attempt fails;
    c restarts and the retry runs under id 2. c decrypts the global model as the result of round
    id 0 (announced in RoundStart.model_round_id), not of ``2 - 1``."""
    names = ["a", "b", "c"]
    fed = ckks_federation(federation, names, rounds=2, deadlines={"phase_s": 3.0})
    add_ckks(fed)
    fed.patch_server(min_sites=3)
    fed.patch_site("c", test_crash_before="ckks_upload", test_crash_round=1)
    fed.start_all()
    failed = fed.state_dir / "rounds" / "round-000001-failed-2.json"
    wait_until(failed.exists, 90, "round 1's first attempt to fail")
    assert json.loads(failed.read_text())["round_id"] == 1
    assert fed.procs["c"].poll() == -9
    fed.patch_site("c", test_crash_before=None)
    fed.start_site("c")
    codes = fed.wait_all(timeout=120)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()
    assert [fed.round_record(r)["round_id"] for r in (0, 1)] == [0, 2]
    assert '"event":"ckks-model-decrypted","round_id":0' in fed.log_text("c")
    # People read the federation round (from 1) beside the protocol's fresh round id.
    assert '"round":2,"round_id":2' in fed.log_text("a")
    for name in names:
        assert (fed.site_dir(name) / "final_model.tensors").exists()
