"""Parity (issue 11): the same round, run in process by the round layer and over gRPC by real
processes (server + sites on loopback, mutual TLS, the same ``insecure_test_seed``), gives the same
result for every aggregation, with no dropout, with one site killed mid-round (SIGKILL by the
injected crash hook; the in-process dropout at the same phase) and with every site clipping its
update in L2 (``aggregation.l2_clip``; expected to fail until the network path carries the bound).

* plain: the same survivors and the bit-identical float64 weighted mean;
* secagg / secagg+: the same survivors, threshold and modular sum (``sum_sha256``), hence the
  same decoded mean and model, bit for bit;
* ckks: the same survivors and share; the models agree within the CKKS error bound only, because
  CKKS encryption is randomised (fresh TenSEAL encryption noise, not driven by the test seed), so
  two runs of one round never give the same ciphertexts or the same low-order bits.

The global model is a float64 zeros tensors file, so the new model after one round *is* the
float64 mean (``0.0 + x == x``): the sites' final models expose the network path's mean exactly.
The in-process side is :func:`secure_fl.transport.simulation.simulate_round` (plain, secagg,
secagg+: :func:`secure_fl.rounds.local.run_local` with the sites' seeded randomness) and
:func:`secure_fl.rounds.local.run_local` over the CKKS halves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transport_helpers import Federation, wait_until

from secure_fl.encoding import flatten
from secure_fl.secagg import Phase
from secure_fl.transport import tensors
from secure_fl.transport.checkpoint import model_blob
from secure_fl.transport.config import load_server_config
from secure_fl.transport.rounds import vector_sha256

# protocols/ckks.md: relative error below 1e-6 for means above about 1e-4.
CKKS_REL_TOL = 1e-6


@dataclass(frozen=True)
class Case:
    """One federation: its sites, aggregation options, model shapes, and the crash (the step
    before which the last site kills itself in round 0, and the in-process dropout phase)."""

    protocol: str
    names: tuple[str, ...]
    aggregation: dict[str, Any]
    shapes: tuple[tuple[int, ...], ...]
    crash: str | None = None

    @property
    def victim(self) -> str | None:
        return self.names[-1] if self.crash is not None else None


# The crash step of each aggregation: the site vanishes before its input (a plain upload is the
# update step; SecAgg's masked input; the CKKS ciphertext upload), after the round was planned
# with its weight (SecAgg, CKKS) or before it reported one (plain).
CRASH = {
    "plain": "update",
    "secagg": "masked_input",
    "secagg+": "masked_input",
    "ckks": "ckks_upload",
}
SETTINGS: dict[str, tuple[tuple[str, ...], dict[str, Any], tuple[tuple[int, ...], ...]]] = {
    "plain": (("a", "b", "c"), {}, ((40, 50), (30,))),
    # Active SecAgg on 4 sites: threshold 3 tolerates the one dropout.
    "secagg": (("a", "b", "c", "d"), {"active": True, "threshold": 3}, ((40, 50), (30,))),
    # A sparse Harary graph (k = 2 of 5): the dropout's masks are recovered from its neighbours.
    "secagg+": (
        ("a", "b", "c", "d", "e"),
        {"k": 2, "threshold": 2, "dropout_rate": 0.0},
        ((40, 50), (30,)),
    ),
    # 9050 values: 3 ciphertexts in 2 frames (streamed, summed as they arrive).
    "ckks": (("a", "b", "c"), {"chunk_ciphertexts": 2}, ((100, 90), (50,))),
}
# The default case (sparse SecAgg+ recovering a dropout's masks over gRPC; the all-survive and the
# SecAgg dropout parity run by default in test_transport_federation.py); the others are slow.
FAST = ("secagg+", "dropout")


#: The L2 bound of the clipped variant: below every synthetic update's norm (about 2), so every
#: site clips (the in-process sites and the network sites alike).
L2_CLIP = 0.5


def _case(protocol: str, variant: str) -> Case:
    names, aggregation, shapes = SETTINGS[protocol]
    if variant == "l2clip":
        aggregation = {**aggregation, "l2_clip": L2_CLIP}
    crash = CRASH[protocol] if variant == "dropout" else None
    return Case(protocol, names, aggregation, shapes, crash)


def _params() -> list[Any]:
    out = []
    for protocol in SETTINGS:
        for variant in ("all", "dropout", "l2clip"):
            marks = [] if (protocol, variant) == FAST else [pytest.mark.slow]
            out.append(pytest.param(protocol, variant, marks=marks, id=f"{protocol}-{variant}"))
    return out


def _float64_model(fed: Federation, shapes: tuple[tuple[int, ...], ...]) -> None:
    """A float64 zeros initial model: after one round the model is the mean itself."""
    model = {f"p{i}": np.zeros(shape, dtype=np.float64) for i, shape in enumerate(shapes)}
    path = fed.root / "initial-float64.tensors"
    path.write_bytes(tensors.dumps(model))
    fed.patch_server(model={"path": str(path), "shapes": [list(s) for s in shapes]})


def _run_network(make: Callable[..., Federation], case: Case) -> tuple[Federation, Path | None]:
    """One round over gRPC; returns the federation and (ckks) the directory of its keys."""
    fed = make(
        list(case.names),
        protocol=case.protocol,
        rounds=1,
        shapes=[list(s) for s in case.shapes],
        aggregation=case.aggregation,
        # A dropout closes its stage at the deadline; generous enough for a loaded machine.
        deadlines={"phase_s": 8.0, "update_s": 8.0} if case.crash else None,
        limits={"max_message_bytes": 256 * 1024, "chunk_bytes": 64 * 1024},
    )
    _float64_model(fed, case.shapes)
    keys = None
    if case.protocol == "ckks":
        from test_transport_ckks import add_ckks

        keys = add_ckks(fed)
    victim = case.victim
    if victim is not None:
        fed.patch_site(victim, test_crash_before=case.crash, test_crash_round=0)
    fed.start_all()
    live = list(case.names)
    if victim is not None:
        crashed = fed.procs[victim]
        wait_until(lambda: crashed.poll() is not None, 90, f"site {victim} to kill itself")
        assert crashed.returncode == -9, fed.log_text(victim)
        live.remove(victim)
    codes = fed.wait_all(timeout=120, sites=live)
    assert codes == dict.fromkeys(["server", *live], 0), fed.all_logs()
    return fed, keys


def _final(fed: Federation, name: str) -> np.ndarray:
    model = tensors.loads((fed.site_dir(name) / "final_model.tensors").read_bytes())
    assert all(v.dtype == np.float64 for v in model.values())
    return np.asarray(flatten(dict(model))[0], dtype=np.float64)


def _expected_survivors(fed: Federation, case: Case) -> list[int]:
    return sorted(fed.ids[n] for n in case.names if n != case.victim)


@pytest.mark.parametrize(("protocol", "variant"), _params())
def test_round_in_process_equals_the_round_over_grpc(
    federation: Callable[..., Federation], protocol: str, variant: str
) -> None:
    """``variant``: every site survives (all), the last site is killed mid-round (dropout), or
    every site clips its update in L2 (l2clip)."""
    if protocol == "ckks":
        pytest.importorskip("tenseal")
    case = _case(protocol, variant)
    fed, keys = _run_network(federation, case)
    record = fed.round_record(0)
    assert record["completed"], record
    survivors = _expected_survivors(fed, case)
    assert record["survivors"] == survivors, record
    live = [n for n in case.names if n != case.victim]
    if protocol == "ckks":
        assert keys is not None
        _check_ckks(fed, case, record, keys, live)
        return
    victim = fed.ids[case.victim] if case.victim is not None else None
    # The plain path learns a weight with its upload: a site dead before it is a dropout of
    # the upload stage (MASKED_INPUT in process), the same survivors and the same divisor.
    dropouts = {0: {victim: Phase.MASKED_INPUT}} if victim is not None else None
    (sim,) = fed.simulate(1, dropouts=dropouts)
    assert sorted(sim.survivors) == survivors
    if protocol != "plain":
        assert sim.config is not None
        assert record["threshold"] == sim.config.threshold
        assert record["k"] == sim.config.degree
        assert sim.config.sparse == (protocol == "secagg+")
        assert record["dropped"] == ([victim] if victim is not None else [])
        assert record["sum_sha256"] == vector_sha256(sim.total), "modular sums differ"
    assert record["model_sha256"] == model_blob(sim.model)[1], "models differ"
    # Every survivor holds the network path's mean, bit for bit (0.0 + mean: what the update of
    # the zeros model does to the sign of a zero).
    want = (np.float64(0.0) + sim.mean).view(np.uint64)
    for name in live:
        got = _final(fed, name)
        assert got.dtype == sim.mean.dtype == np.float64
        assert np.array_equal(got.view(np.uint64), want), f"site {name}: means differ"
    assert np.any(sim.mean != 0)
    if case.aggregation.get("l2_clip") is not None:
        # The clip happened in process: a mean of updates of norm <= L2_CLIP (unclipped: about
        # 2), up to SecAgg's fixed-point rounding.
        assert np.linalg.norm(sim.mean) <= L2_CLIP * 1.001


def _check_ckks(
    fed: Federation, case: Case, record: dict[str, Any], keys: Path, live: list[str]
) -> None:
    """CKKS: the same survivors, dropped sites and share; the decrypted models within the CKKS
    error bound of each other and of the exact float64 weighted mean."""
    from secure_fl.encoding import l2_clip
    from secure_fl.he import PublicContext, SecretContext
    from secure_fl.rounds.ckks import CkksServerRound, CkksSiteRound
    from secure_fl.rounds.local import run_local
    from secure_fl.rounds.messages import CkksResult
    from secure_fl.rounds.plan import plan_round
    from secure_fl.transport.rounds import initial_model

    config = load_server_config(fed.server_config)
    model = initial_model(config.model)
    secret = SecretContext.load(keys / "ckks-secret.ctx")
    public = PublicContext.load(keys / "ckks-public.ctx")
    results = {s: t.compute_update(model, 0) for s, t in fed.tasks().items()}
    # The gRPC site encrypts its new local model, global + update: the update (global is 0.0).
    vectors = {s: flatten(dict(r.update))[0].astype(np.float64) for s, r in results.items()}
    bound_l2 = case.aggregation.get("l2_clip")
    weights = {s: float(r.weight) for s, r in results.items()}
    plan = plan_round(
        config.aggregation,
        weights,
        vector_length=len(vectors[1]),
        round_id=int(record["round_id"]),
    )
    halves = {s: CkksSiteRound(s, secret=secret) for s in plan.ids}
    victim = fed.ids[case.victim] if case.victim is not None else None
    outcome = run_local(
        plan,
        vectors,
        server=CkksServerRound(plan, public),
        sites=halves,
        dropouts={victim: Phase.MASKED_INPUT} if victim is not None else None,
    )
    assert sorted(outcome.survivors) == record["survivors"]
    assert sorted(outcome.dropped) == record["dropped"]
    assert outcome.record["ckks_share"] == record["ckks_share"]  # the same float, exactly
    assert outcome.encrypted is not None
    reader = halves[min(outcome.survivors)]
    reader.handle(CkksResult(round_id=plan.round_id, payload=outcome.encrypted))
    assert reader.model is not None
    local = np.asarray(reader.model["vector"], dtype=np.float64)
    included = sorted(outcome.survivors)
    clipped = {s: l2_clip(vectors[s], bound_l2)[0] if bound_l2 else vectors[s] for s in included}
    exact = sum(weights[s] * clipped[s] for s in included) / sum(weights[s] for s in included)
    peak = float(np.max(np.abs(exact)))
    assert peak > 1e-4  # the relative bound applies
    bound = CKKS_REL_TOL * peak
    finals = [_final(fed, name) for name in live]
    for got in finals:
        np.testing.assert_array_equal(got, finals[0])  # one ciphertext, decrypted by each
    assert float(np.max(np.abs(local - exact))) <= bound
    assert float(np.max(np.abs(finals[0] - exact))) <= bound
    assert float(np.max(np.abs(finals[0] - local))) <= 2 * bound
    # Randomised encryption: the two runs' low-order bits differ (same seeds, other noise).
    assert not np.array_equal(finals[0], local)
