"""The "one release per model" guard is keyed by what the model *is*, not by the bytes served.

The attack (found by the attacker review): ``tensors.loads`` accepts any
JSON header, so a byte-different copy of bit-identical tensors had a new SHA-256; tasks are
deterministic in (model, round index) and the server chooses both, so a second SecAgg round on
the "same" model with one site left out gave that site's exact update by differencing the two
sums. Here the real site code (:class:`SiteRunner` threads over mutual TLS, as in
``tests/adversary/test_grpc.py``) faces a server that does exactly that.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adversary.test_grpc import Fed, SpyServer

from secure_fl.errors import InvalidUpdateError, PolicyError
from secure_fl.transport import tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes
from secure_fl.transport.replay import ContributionGuard
from secure_fl.transport.rounds import sha256


def reserialised(model: tensors.Tensors, *, order: list[str] | None = None) -> bytes:
    """``model`` serialised again with an extra header key (and optionally another tensor order
    and float64 instead of float32): other bytes, the same numbers."""
    names = order or list(model)
    blob = tensors.dumps({n: model[n].astype(np.float64) for n in names})
    hlen = int.from_bytes(blob[8:16], "little")
    header = json.loads(blob[16 : 16 + hlen])
    header["pad"] = 1
    raw = json.dumps(header, separators=(",", ":")).encode()
    return blob[:8] + len(raw).to_bytes(8, "little") + raw + blob[16 + hlen :]


class ReserialisingServer(SpyServer):
    """After round 1, serves the initial model again under new bytes (an extra header key, the
    tensors reversed and in float64) and leaves site ``c`` out of round 2: the sum of round 2
    minus the sum of round 1 would be c's exact update."""

    served: list[bytes]

    def initial(self, model: tensors.Tensors) -> tensors.Tensors:
        """The model round 1 runs on (subclasses may change it)."""
        return model

    def reserve(self, initial: tensors.Tensors) -> bytes:
        """The bytes that serve the round-1 model again (subclasses change how)."""
        return reserialised(initial, order=list(reversed(initial)))

    def _set_model(self, model: Any) -> None:
        if not self._digest:  # the initial model
            self.served = []
            self._initial = self.initial(model)
            super()._set_model(self._initial)
            return
        blob = self.reserve(self._initial)
        self._model, self._blob, self._digest = self._initial, blob, sha256(blob)
        header = pb.PayloadHeader(kind=pb.MODEL, length=len(self._initial))
        self._model_chunks = list(iter_chunk_bytes(header, blob, self.config.limits.chunk_bytes))
        self.served.append(blob)

    def _post(self, rs: Any, site: int, kind: str, message: Any) -> None:
        left_out = self.config.site_by_name("c")
        if rs.index == 1 and left_out is not None and site == left_out.site_id:
            return  # c never hears of round 2
        super()._post(rs, site, kind, message)


@pytest.fixture
def fed(tmp_path: Path) -> Callable[..., Fed]:
    def make(names: list[str], **kwargs: Any) -> Fed:
        return Fed(tmp_path / "fed", names, **kwargs)

    return make


def test_reserialised_model_gets_no_second_release(fed: Callable[..., Fed]) -> None:
    """Round 1 (all four sites) completes. Round 2 runs under a fresh round id on a byte-different
    copy of the same model, without site c: every participating site refuses it at RoundStart,
    after loading the model and before computing anything (no ReportUpdateReady, no unmasking),
    naming the same model. Fails before this fix: the digest was the SHA-256 of the bytes, so
    round 2 completed and two sums over {a,b,c,d} and {a,b,d} of the same updates reached the
    server."""
    run = fed(["a", "b", "c", "d"], rounds=2).run(ReserialisingServer)
    records = run.records()
    assert records[0]["completed"] and records[0]["round_id"] == 0, records
    server = run.server
    assert isinstance(server, ReserialisingServer) and server.served
    # The served copy really is other bytes of the same numbers.
    initial = server._initial
    assert sha256(server.served[0]) != sha256(tensors.dumps(initial))
    copy = tensors.loads(server.served[0])
    assert all(np.array_equal(copy[k], initial[k]) for k in initial)
    # Round 1: 4 reports and 4 unmask responses; round 2: none at all.
    assert len(server.sent("ReportUpdateReady")) == 4, server.sent("ReportUpdateReady")
    assert len(server.sent("SendUnmaskResponse")) == 4
    assert not any(r["completed"] for r in records[1:]), records
    for name in ("a", "b", "d"):
        assert any("same model" in w for w in run.warnings(name)), (name, run.warnings(name))
    assert run.warnings("c") == []
    assert run.server_status != 0


# -- the digest itself ----------------------------------------------------------------------------


def _model(seed: int = 0) -> tensors.Tensors:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((3, 2)).astype(np.float32),
        "conv.bias": np.array([0.0, -0.0, 1.5], dtype=np.float32),
    }


def test_content_digest_ignores_presentation_not_values() -> None:
    """Same digest: re-serialised bytes, another tensor order, float64 for float32, another shape,
    -0.0 for 0.0. Another digest: one value changed by one ulp, a tensor renamed or missing."""
    model = _model()
    digest = tensors.content_digest(model)
    assert tensors.content_digest(tensors.loads(reserialised(model))) == digest
    variants = [
        {k: model[k] for k in reversed(model)},
        {k: v.astype(np.float64) for k, v in model.items()},
        {k: v.reshape(-1) for k, v in model.items()},
        {**model, "conv.bias": np.array([-0.0, 0.0, 1.5], dtype=np.float32)},
    ]
    for variant in variants:
        assert tensors.content_digest(variant) == digest
    bumped = model["conv.weight"].copy()
    bumped[0, 0] = np.nextafter(bumped[0, 0], np.float32(np.inf))
    changed = [
        {**model, "conv.weight": bumped},
        {"conv.w": model["conv.weight"], "conv.bias": model["conv.bias"]},
        {"conv.weight": model["conv.weight"]},
    ]
    for other in changed:
        assert tensors.content_digest(other) != digest


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_content_digest_refuses_non_finite_models(bad: float) -> None:
    model = _model()
    model["conv.weight"][1, 1] = bad
    with pytest.raises(InvalidUpdateError, match=r"conv\.weight.*NaN or infinite"):
        tensors.content_digest(model)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=20),
    st.randoms(use_true_random=False),
)
def test_content_digest_is_a_function_of_names_and_values(values: list[float], random: Any) -> None:
    """Any serialisation and order of the same named values has one digest."""
    a = np.array(values, dtype=np.float32)
    b = np.array(values[::-1], dtype=np.float32)
    model = {"a": a, "b": b}
    order = ["a", "b"]
    random.shuffle(order)
    copy = tensors.loads(reserialised(model, order=order))
    assert tensors.content_digest(copy) == tensors.content_digest(model)


def test_guard_refuses_a_second_release_of_the_same_content(tmp_path: Path) -> None:
    """ContributionGuard keyed by content: a re-serialised copy is the same model (persisted);
    a fresh round id alone is not refused before the model is known."""
    path = tmp_path / "contributions.json"
    guard = ContributionGuard(path, "fed")
    model = _model()
    guard.check_fresh(0)
    guard.record_release(0, tensors.content_digest(model))
    copy = tensors.loads(reserialised(model))
    guard.check_fresh(1)  # the round id is fresh
    with pytest.raises(PolicyError, match="same model"):
        ContributionGuard(path, "fed").check_fresh(1, tensors.content_digest(copy))
    guard.check_fresh(1, tensors.content_digest(_model(1)))
