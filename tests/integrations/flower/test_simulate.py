"""simulate(): one aggregation through Flower's simulation engine (Ray) returns what
aggregators.create(...).aggregate returns. The run_simulation tests are slow (Ray starts in
about 10 s and a round crosses several Ray actors: about 20-30 s each on two cores)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from secure_fl import aggregators  # noqa: E402
from secure_fl.aggregators.base import REPORT_KEYS  # noqa: E402
from secure_fl.errors import ConfigError, InvalidUpdateError  # noqa: E402
from secure_fl.integrations.flower import records  # noqa: E402
from secure_fl.integrations.flower.simulate import DropAtInput, simulate  # noqa: E402
from secure_fl.rounds import codec  # noqa: E402
from secure_fl.secagg.messages import ShareDelivery  # noqa: E402

WEIGHTS = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}


def _updates(names: list[str], size: int = 5) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(7)
    return {n: [rng.normal(size=size).astype(np.float32), rng.normal(size=2)] for n in names}


def _exact(updates: dict[str, list[np.ndarray]], sites: list[str]) -> list[np.ndarray]:
    total = sum(WEIGHTS[s] for s in sites)
    return [
        np.sum([WEIGHTS[s] * updates[s][k].astype(np.float64) for s in sites], axis=0) / total
        for k in range(2)
    ]


def _check(protocol: str, names: list[str], dropped: list[str], **options: Any) -> Any:
    ups = _updates(names)
    weights = {n: WEIGHTS[n] for n in names}
    got = simulate(ups, weights, protocol=protocol, dropped=dropped, **options)
    ref = aggregators.create(protocol, **options).aggregate(ups, weights, dropped=dropped)
    assert tuple(got.report) == REPORT_KEYS
    unset = {k for k, v in got.report.items() if v is None}
    unmeasured = {"site_seconds"} | ({"server_seconds"} if protocol == "ckks" else set())
    assert unset - unmeasured == {k for k, v in ref.report.items() if v is None} - unmeasured
    same = ("aggregator", "included", "dropped", "clipped", "clipped_total", "clipped_updates")
    for key in (*same, "round", "excluded", "max_rel_error" if protocol == "plain" else "round"):
        assert got.report[key] == ref.report[key], key
    for key in ("threshold", "k", "active", "bits", "frac_bits", "clip_range", "preset"):
        assert got.report[key] == ref.report[key], key
    assert [a.dtype for a in got.mean] == [a.dtype for a in ref.mean]
    if protocol == "plain":  # deterministic: bit for bit the aggregator's mean
        for mine, theirs in zip(got.mean, ref.mean, strict=True):
            np.testing.assert_array_equal(mine, theirs)
        return got
    exact = _exact(ups, [n for n in names if n not in dropped])
    tol = got.report["max_error"] if protocol != "ckks" else 1e-6
    for mine, want in zip(got.mean, exact, strict=True):
        np.testing.assert_allclose(mine.astype(np.float64), want, atol=max(tol, 1e-6))
    return got


@pytest.mark.slow
def test_simulate_secagg_plus_with_a_dropout() -> None:
    got = _check("secagg+", ["a", "b", "c", "d"], ["b"], threshold=3)
    assert got.report["included"] == ["a", "c", "d"]
    assert set(got.report["bytes_sent"]) == {"a", "b", "c", "d"}


@pytest.mark.slow
def test_simulate_ckks_with_a_dropout() -> None:
    got = _check("ckks", ["a", "b", "c"], ["c"])
    assert got.report["fingerprint"] and got.report["decrypt_seconds"] is not None
    assert got.report["max_error"] < 1e-6


@pytest.mark.slow
def test_simulate_plain() -> None:
    got = _check("plain", ["a", "b", "c"], [], l2_clip=1.5)
    assert got.report["max_error"] == 0.0
    assert got.report["clipped_updates"] == ["b", "c"]  # a's norm is below 1.5


def test_simulate_refuses_seed_and_contexts_before_starting() -> None:
    ups = _updates(["a", "b"])
    with pytest.raises(ConfigError, match="seed"):
        simulate(ups, protocol="secagg", seed=1)
    with pytest.raises(ConfigError, match="secret"):
        simulate(ups, protocol="ckks", secret="x")
    with pytest.raises(ConfigError, match="unknown option"):
        simulate(ups, protocol="plain", threshold=2)
    with pytest.raises(InvalidUpdateError, match="at least 2"):
        simulate(_updates(["a"]), protocol="plain")


def test_drop_mod_fails_only_at_the_masked_input() -> None:
    """The dropout mod raises for its nodes at the ShareDelivery step (SecAgg) or the setup
    (plain, CKKS), and passes every other message on."""
    from flwr.app import Message

    calls: list[str] = []

    def call_next(message: Any, context: Any) -> str:
        calls.append("next")
        return "reply"

    def message(stage: str, frame: bytes | None) -> Any:
        content = RecordDict({records.KEY: records.to_record(records.Envelope(stage, 5, frame))})
        msg = Message.__new__(Message)
        msg.__dict__.update(_content=content, _error=None, _metadata=None)
        return msg

    ctx = Context(1, 2, {"partition-id": 1}, RecordDict(), {})
    other = Context(1, 3, {"partition-id": 0}, RecordDict(), {})
    delivery = codec.encode(ShareDelivery(round_id=5, ciphertexts=()))
    secagg, plain = DropAtInput([1], "secagg+"), DropAtInput([1], "plain")
    assert secagg(message("setup", b"x"), ctx, call_next) == "reply"
    assert secagg(message("step", delivery), other, call_next) == "reply"
    with pytest.raises(RuntimeError, match="dropout"):
        secagg(message("step", delivery), ctx, call_next)
    with pytest.raises(RuntimeError, match="dropout"):
        plain(message("setup", b"x"), ctx, call_next)
    assert plain(message("train", None), ctx, call_next) == "reply"
    assert calls == ["next"] * 3
