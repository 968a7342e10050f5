"""The one-release-per-model guard against a *re-typed* model (the Flower review's attack A4).

The attack: the server re-sends a released float32 model as float64 values nudged below float32
resolution (``w * (1 + 2**-40)``). A task that trains in float32 (torch ``load_state_dict``
casts) trains on a bit-identical model, so its update is the same; but version 1 of the content
digest (values upcast to float64) differed, so the guard let the site release that update a
second time under a fresh round id, and two sums, one without the site, differenced into its
exact update. The guard now keys by :func:`tensors.release_key` (first digest
:func:`tensors.content_digest_v2`: values rounded to float32), and still consults the version-1
digests that older versions recorded.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adversary.test_grpc import Fed
from transport.test_transport_replay import ReserialisingServer

from secure_fl.errors import InvalidUpdateError, PolicyError
from secure_fl.transport import tensors
from secure_fl.transport.replay import ContributionGuard
from secure_fl.transport.rounds import sha256
from secure_fl.transport.site_model import SiteModel

NUDGE = 1.0 + 2.0**-40


def _model(seed: int = 0) -> tensors.Tensors:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "conv.bias": np.array([0.0, -0.0, 1.5, -2.25], dtype=np.float32),
        "norm.weight": rng.standard_normal(4).astype(np.float16),
    }


def nudged(model: tensors.Tensors) -> tensors.Tensors:
    """``model`` as float64 values nudged below float32 resolution (other float64 numbers, the
    same float32 model), in reverse order."""
    return {k: model[k].astype(np.float64) * NUDGE for k in reversed(list(model))}


def _no_fail_closed(reason: str) -> NoReturn:
    raise AssertionError(f"fail_closed called: {reason}")


def _loaded_key(model: tensors.Tensors) -> bytes:
    """What the gRPC site's SiteModel keys the release guard by, for a download of ``model``.
    (The plain, unencrypted path reads nothing from the site config.)"""
    blob = tensors.dumps(model)
    site_model = SiteModel(cast(Any, None), None, _no_fail_closed)
    site_model.ensure(sha256(blob), lambda digest: blob, allow_encrypted=False)
    return site_model.content


def test_a_nudged_float64_copy_is_the_same_model_to_a_float32_task() -> None:
    """The premise of the attack, checked: other float64 numbers and another version-1 digest,
    yet bit-identical once cast to float32 (what load_state_dict does for a float32 model)."""
    model = _model()
    copy = nudged(model)
    assert any(np.any(copy[k] != model[k].astype(np.float64)) for k in model)
    assert tensors.content_digest(copy) != tensors.content_digest(model)
    for k in model:
        assert copy[k].astype(model[k].dtype).tobytes() == model[k].tobytes()


def test_guard_refuses_a_nudged_float64_copy_of_a_released_float32_model(tmp_path: Path) -> None:
    """The SiteModel + ContributionGuard path of the gRPC site: round 0 releases the float32
    model; a fresh site process (a new guard and SiteModel on the same record) is served the
    nudged float64 copy under round 1 and refuses it as already released, at check_fresh (before
    training) and at record_release (before unmasking). Failed before the v2 digest: the key was
    content_digest (float64 values), so round 1 was accepted."""
    path = tmp_path / "contributions.json"
    model = _model()
    ContributionGuard(path, "fed").record_release(0, _loaded_key(model))
    key = _loaded_key(nudged(model))
    guard = ContributionGuard(path, "fed")
    with pytest.raises(PolicyError, match="same model"):
        guard.check_fresh(1, key)
    with pytest.raises(PolicyError, match="release it again"):
        guard.record_release(1, key)
    # A retry of round 0 itself, and a model that really differs (one float32 ulp), still pass.
    guard.check_fresh(1, _loaded_key(_model(1)))
    moved = dict(model)
    moved["conv.bias"] = np.nextafter(model["conv.bias"], np.float32(9))
    guard.check_fresh(1, _loaded_key(moved))


def test_records_of_older_versions_still_refuse_the_model(tmp_path: Path) -> None:
    """A contributions.json written before the v2 digest holds version-1 digests: the model it
    names is refused whether re-sent as is, re-typed to float64 or nudged; new releases are
    recorded under v2."""
    path = tmp_path / "contributions.json"
    model = _model()
    exact64 = {"w": np.array([0.1, -0.3, 1e-9], dtype=np.float64)}  # not exact in float32
    old = {tensors.content_digest(model).hex(): 0, tensors.content_digest(exact64).hex(): 1}
    path.write_text(json.dumps({"fed": {"highest_round": 1, "released_content": old}}))
    guard = ContributionGuard(path, "fed")
    for variant in (model, nudged(model), {k: v.astype(np.float64) for k, v in model.items()}):
        with pytest.raises(PolicyError, match="same model"):
            guard.check_fresh(2, _loaded_key(variant))
    with pytest.raises(PolicyError, match="same model"):
        guard.check_fresh(2, _loaded_key(exact64))
    guard.check_fresh(2, _loaded_key(_model(1)))
    guard.record_release(2, _loaded_key(_model(1)))
    record = json.loads(path.read_text())["fed"]
    assert record["released_content"] == old
    assert record["released_content_v2"] == {tensors.content_digest_v2(_model(1)).hex(): 2}


def test_guard_refuses_a_key_that_is_not_whole_digests(tmp_path: Path) -> None:
    guard = ContributionGuard(tmp_path / "contributions.json", "fed")
    for bad in (b"", b"x" * 31, b"x" * 33):
        with pytest.raises(PolicyError, match="32-byte digests"):
            guard.check_fresh(0, bad)


# -- the v2 digest itself -------------------------------------------------------------------------


def _reference_v2(model: tensors.Tensors) -> bytes:
    """content_digest_v2's definition, computed on whole float32 copies."""
    h = hashlib.sha256(tensors.CONTENT_DOMAIN_V2)
    h.update(len(model).to_bytes(8, "little"))
    for name in sorted(model):
        values = model[name].reshape(-1).astype("<f4") + np.float32(0.0)
        h.update(len(name.encode()).to_bytes(8, "little") + name.encode())
        h.update(values.size.to_bytes(8, "little"))
        h.update(values.tobytes())
    return h.digest()


def test_content_digest_v2_is_the_float32_definition() -> None:
    big: tensors.Tensors = {
        "a": np.random.default_rng(3).standard_normal(70_001),
        "b": np.zeros(0, np.float32),
    }
    for model in (_model(), nudged(_model()), big):
        assert tensors.content_digest_v2(model) == _reference_v2(model)
    assert tensors.content_digest_v2(_model()) == tensors.content_digest_v2(nudged(_model()))
    assert tensors.content_digest_v2(_model()) != tensors.content_digest(_model())  # new domain
    # Another float32 value (one ulp), another name or a value moved between tensors: another model.
    model = _model()
    other = dict(model, **{"conv.weight": np.nextafter(model["conv.weight"], np.float32(0))})
    assert tensors.content_digest_v2(other) != tensors.content_digest_v2(model)
    renamed = {("x" + k if k == "conv.bias" else k): v for k, v in model.items()}
    assert tensors.content_digest_v2(renamed) != tensors.content_digest_v2(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39])
def test_content_digest_v2_refuses_what_float32_cannot_hold(bad: float) -> None:
    model = {"w": np.array([1.0, bad], dtype=np.float64)}
    reason = "beyond the float32 range" if np.isfinite(bad) else "NaN or infinite"
    with pytest.raises(InvalidUpdateError, match=reason):
        tensors.content_digest_v2(model)
    with pytest.raises(InvalidUpdateError, match=reason):
        tensors.release_key(model)


def test_release_key_layout() -> None:
    """v2, then v1 of the float32 rounding, then (only when it differs) v1 as given."""
    model = _model()
    v2 = tensors.content_digest_v2(model)
    assert tensors.release_key(model) == v2 + tensors.content_digest(model)
    copy = nudged(model)
    rounded = {k: v.astype(np.float32) for k, v in copy.items()}
    assert tensors.release_key(copy) == (
        v2 + tensors.content_digest(rounded) + tensors.content_digest(copy)
    )
    assert tensors.content_digest(rounded) == tensors.content_digest(model)


# -- the real site over gRPC ----------------------------------------------------------------------


class NudgingServer(ReserialisingServer):
    """After round 1, serves the initial model again as float64 nudged below float32 resolution
    (in reverse order) and leaves site ``c`` out of round 2."""

    def initial(self, model: tensors.Tensors) -> tensors.Tensors:
        # nonzero float32 values of the same shapes (a nudge of zero is no nudge)
        rng = np.random.default_rng(7)
        return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}

    def reserve(self, initial: tensors.Tensors) -> bytes:
        return tensors.dumps(nudged(initial))


@pytest.fixture
def fed(tmp_path: Path) -> Callable[..., Fed]:
    def make(names: list[str], **kwargs: Any) -> Fed:
        return Fed(tmp_path / "fed", names, **kwargs)

    return make


def test_nudged_float64_model_gets_no_second_release(fed: Callable[..., Fed]) -> None:
    """Round 1 (four sites) completes on a float32 model; round 2, under a fresh round id and
    without c, serves it as nudged float64: every participating site refuses it at RoundStart
    (no second report, no unmasking), naming the same model. Failed before the v2 digest: the
    sites took part and the server got two sums of the same updates, one without c."""
    run = fed(["a", "b", "c", "d"], rounds=2).run(NudgingServer)
    records = run.records()
    assert records[0]["completed"] and records[0]["round_id"] == 0, records
    server = run.server
    assert isinstance(server, NudgingServer) and server.served
    initial = server._initial
    served = tensors.loads(server.served[0])
    assert all(initial[k].dtype == np.float32 and served[k].dtype == np.float64 for k in initial)
    assert tensors.content_digest(served) != tensors.content_digest(initial)
    assert all(np.array_equal(served[k].astype(np.float32), initial[k]) for k in initial)
    assert len(server.sent("ReportUpdateReady")) == 4, server.sent("ReportUpdateReady")
    assert len(server.sent("SendUnmaskResponse")) == 4
    assert not any(r["completed"] for r in records[1:]), records
    for name in ("a", "b", "d"):
        assert any("same model" in w for w in run.warnings(name)), (name, run.warnings(name))
    assert run.warnings("c") == []
