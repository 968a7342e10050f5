"""The coordinator's CKKS round without sockets: each complete upload goes into the running sum
as it arrives (nothing buffered), a site that never uploads is a dropout, and the encrypted sum
becomes the global model that a site decrypts to the weighted mean of the contributors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from coordinator_fakes import MODEL, Harness, harness, make_config

from secure_fl.encoding import flatten
from secure_fl.he import SecretContext
from secure_fl.rounds.ckks import CkksSiteRound, ckks_setup_from_pb
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import server_rounds
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.stages import Stage


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate()


class _EncryptedHost:
    """Adds the encrypted-model side to the fake host."""

    def __init__(self, h: Harness) -> None:
        self.blobs: list[bytes] = []
        h.host.set_encrypted_model = self.blobs.append  # type: ignore[method-assign,assignment]
        structure = ckks_wire.structure_of(MODEL)
        view = h.host.model_view

        def model_view() -> Any:
            return type(view())(h.host.model, h.host.digest, len(h.host.blob), False, structure)

        h.host.model_view = model_view  # type: ignore[method-assign]


def _upload(secret: SecretContext, inst: Any, site: int, vector: np.ndarray) -> bytes:
    half = CkksSiteRound(site, secret=secret, expected_fingerprint=secret.fingerprint)
    message = half.on_setup(
        ckks_setup_from_pb(inst.ckks_setup, inst.round_id), update=vector, reported_weight=1.0
    )
    return bytes(message.payload)  # type: ignore[union-attr]


def test_ckks_uploads_are_summed_as_they_arrive_and_a_silent_site_is_a_dropout(
    secret: SecretContext,
) -> None:
    h = harness(make_config("ckks", n=3), public=secret.public())
    models = _EncryptedHost(h)
    h.join(1, 2, 3)
    h.tick()
    rid = h.attempt().round_id
    weights = {1: 1.0, 2: 3.0, 3: 2.0}
    for site, weight in weights.items():
        h.coord.update_ready(site, rid, weight, h.clock())
    h.tick()
    assert h.coord.stage is Stage.CKKS_UPLOAD
    size = flatten(dict(MODEL))[0].size
    vectors = {s: np.full(size, float(s)) for s in weights}
    for site in (1, 2):  # c never uploads
        inst = h.next(site)
        assert inst is not None and inst.WhichOneof("kind") == "ckks_setup"
        ck = h.coord.check_ckks(site, rid, h.clock())
        server_rounds.ckks_add(ck, site, _upload(secret, inst, site, vectors[site]))
        h.coord.ckks_upload(site, rid, h.clock())
        with pytest.raises(RejectedError, match="already uploaded"):
            h.coord.check_ckks(site, rid, h.clock())
    running = h.attempt().ckks
    assert running is not None and set(running.round.sum.complete) == {"a", "b"}  # summed
    h.tick(11)  # the upload deadline: c is a dropout
    assert h.coord.completed == 1 and len(models.blobs) == 1
    record = h.host.records["round-000000"]
    assert record["survivors"] == [1, 2] and record["dropped"] == [3]
    assert record["ckks_share"] == pytest.approx(4.0 / 6.0)
    model = ckks_wire.decrypt_model(secret, models.blobs[0], expected_round=rid)
    flat = flatten(dict(model))[0]
    assert np.allclose(flat, (1.0 * 1 + 3.0 * 2) / 4.0, atol=1e-3)


def test_ckks_round_with_one_upload_fails_and_is_retried(secret: SecretContext) -> None:
    h = harness(make_config("ckks", n=3), public=secret.public())
    _EncryptedHost(h)
    h.join(1, 2, 3)
    h.tick()
    rid = h.attempt().round_id
    for site in (1, 2, 3):
        h.coord.update_ready(site, rid, 1.0, h.clock())
    h.tick()
    size = flatten(dict(MODEL))[0].size
    inst = h.next(1)
    ck = h.coord.check_ckks(1, rid, h.clock())
    server_rounds.ckks_add(ck, 1, _upload(secret, inst, 1, np.ones(size)))
    h.coord.ckks_upload(1, rid, h.clock())
    h.tick(11)
    assert h.coord.completed == 0
    assert "at least 2" in h.host.records["round-000000-failed-1"]["reason"]


def _tainted_attempt(
    secret: SecretContext, monkeypatch: pytest.MonkeyPatch, h: Harness
) -> tuple[int, _EncryptedHost]:
    """Run one CKKS attempt among a, b, c whose sum site c's cut upload tainted."""
    from secure_fl.he.stream import TaintedSumError

    models = _EncryptedHost(h)
    h.join(1, 2, 3)
    h.tick()
    rid = h.attempt().round_id
    for site in (1, 2, 3):
        h.coord.update_ready(site, rid, 1.0, h.clock())
    h.tick()
    size = flatten(dict(MODEL))[0].size
    for site in (1, 2, 3):
        inst = h.next(site)
        ck = h.coord.check_ckks(site, rid, h.clock())
        server_rounds.ckks_add(ck, site, _upload(secret, inst, site, np.ones(size)))
        h.coord.ckks_upload(site, rid, h.clock())

    def tainted(_: object) -> Any:
        raise TaintedSumError("site c's upload was cut after 2 frames", {"c"})

    monkeypatch.setattr(server_rounds, "ckks_close", tainted)
    h.tick(11)
    monkeypatch.undo()
    return rid, models


def test_a_site_whose_cut_upload_tainted_the_sum_is_left_out_of_the_retry(
    secret: SecretContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site that streams some frames of its upload and stops (a malicious site, or a broken
    link) taints the running sum (secure_fl.he.stream): that attempt fails, and the round's next
    attempt runs without the site, so one site cannot fail every attempt of a CKKS federation.
    (That a cut upload taints the sum is tested in tests/rounds/test_rounds_ckks.py.)"""
    h = harness(make_config("ckks", n=3), public=secret.public())
    rid, models = _tainted_attempt(secret, monkeypatch, h)
    assert h.coord.completed == 0 and not models.blobs
    assert h.coord.benched == {0: {3}}
    h.tick(31)  # the next attempt starts without c
    retry = h.attempt()
    assert retry.round_id != rid and set(retry.participants) == {1, 2}


def test_the_bench_is_lifted_when_the_round_could_not_run_without_the_site(
    secret: SecretContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With min_sites = every site, benching c would leave the round unable to start ever (or
    start below min_sites and fail until the server gives up): c is let back in instead."""
    h = harness(make_config("ckks", n=3, min_sites=3), public=secret.public())
    rid, _ = _tainted_attempt(secret, monkeypatch, h)
    assert h.coord.completed == 0
    h.tick(31)
    retry = h.attempt()
    assert retry.round_id != rid and set(retry.participants) == {1, 2, 3}
    assert h.coord.benched == {}
