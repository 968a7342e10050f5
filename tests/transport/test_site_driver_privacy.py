"""The site driver's privacy floor (distributed DP) and CKKS half, without sockets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from site_driver_helpers import (
    DriverFed,
    FixedTask,
    make_federation,
    round_start,
    secagg_setup,
)

from secure_fl.errors import PolicyError
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.site_driver import FAIL_CLOSED_MARKER
from secure_fl.transport.site_replies import Upload


def _ckks_upload(driver: Any, fed: Any, weight: float) -> tuple[Any, Upload, np.ndarray]:
    """Send ``driver`` (a site that reported its weight in round 1) the CKKS setup with
    ``weight``; its setup, its one reply (an upload) and the upload's values decrypted with
    the site's own secret context."""
    import tenseal as ts

    from secure_fl.he.model import unpack_frames
    from secure_fl.he.wire import decode_frame

    secret = driver.models.secret()
    size = sum(int(v.size) for v in fed.model.values())
    setup = pb.CkksSetup(
        context_sha256=bytes.fromhex(secret.fingerprint),
        poly_modulus_degree=secret.preset.poly_modulus_degree,
        scale=secret.preset.scale,
        weight=weight,
        vector_length=size,
        chunk_ciphertexts=64,
    )
    inst = pb.Instruction(attempt=1, index=1, round_id=1, ckks_setup=setup)
    (upload,) = driver.handle(inst, fed.fetch).replies
    assert isinstance(upload, Upload) and upload.rpc == "UploadCiphertext"
    values = np.concatenate(
        [
            np.asarray(ts.ckks_vector_from(secret.tenseal_context, blob).decrypt())
            for frame in unpack_frames(upload.data, upload.header.length)
            for blob in decode_frame(frame).blobs
        ]
    )[:size]
    return setup, upload, values


@pytest.fixture
def fed(tmp_path: Path) -> DriverFed:
    return make_federation(tmp_path, ["a", "b", "c"], ckks=False)


class _Privacy:
    """A stand-in for transport.privacy.SitePrivacy with a floor on the noise multiplier."""

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.hooked: list[Any] = []

    def check(self, text: str) -> Any:
        if not text:
            return None
        cfg = json.loads(text)
        if cfg["noise_multiplier"] < self.floor:
            raise PolicyError(f"noise_multiplier {cfg['noise_multiplier']} is below the floor")
        return dataclasses.make_dataclass("Cfg", ["clip", "noise_multiplier"])(**cfg)

    def noise_hook(self, cfg: Any) -> Any:
        def hook(values: np.ndarray, setup: Any) -> np.ndarray:
            self.hooked.append(setup.distributed_dp_json)
            return values

        return hook


def _dp_setup(fed: DriverFed, dp: str) -> pb.Instruction:
    _, setups = secagg_setup(fed, 1, [1, 2, 3])
    setups[1].secagg_setup.distributed_dp_json = dp
    return setups[1]


def test_distributed_dp_below_the_floor_is_refused_and_above_it_noised(fed: DriverFed) -> None:
    privacy = _Privacy(floor=1.0)
    driver, log = fed.driver("a", privacy=privacy)
    driver.handle(round_start(1, 1, fed.digest), fed.fetch)
    low = json.dumps({"clip": 1.0, "noise_multiplier": 0.5})
    assert driver.handle(_dp_setup(fed, low), fed.fetch).replies == ()
    assert "below the floor" in log.named("policy-refused")[-1]["reason"]
    assert privacy.hooked == []
    driver2, _ = fed.driver("a", privacy=privacy)
    driver2.handle(round_start(1, 2, fed.digest), fed.fetch)
    ok = json.dumps({"clip": 1.0, "noise_multiplier": 1.5})
    setup = _dp_setup(fed, ok)
    setup.round_id = 2
    replies = driver2.handle(setup, fed.fetch).replies
    assert [r.rpc for r in replies] == ["SendAdvertiseKeys"] and privacy.hooked == [ok]


def test_a_site_that_requires_dp_refuses_a_round_without_it(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, ["a", "b", "c"], ckks=False)
    config = fed.configs["a"]
    fed.configs["a"] = dataclasses.replace(
        config,
        policy=dataclasses.replace(
            config.policy, aggregations=("secagg+", "ckks"), require_dp=True
        ),
    )
    driver, log = fed.driver("a", privacy=_Privacy(floor=1.0))
    driver.handle(round_start(1, 1, fed.digest), fed.fetch)
    assert driver.handle(_dp_setup(fed, ""), fed.fetch).replies == ()
    assert "policy.require_dp" in log.named("policy-refused")[-1]["reason"]
    # CKKS and plain carry no distributed noise: refused at the round's start.
    assert driver.handle(round_start(2, 2, fed.digest, "ckks"), fed.fetch).replies == ()
    assert "require_dp" in log.named("policy-refused")[-1]["reason"]


def test_ckks_clips_a_new_local_model_out_of_range_and_uploads(tmp_path: Path) -> None:
    """Local training that overshoots any bound: whether the new local model fits depends on
    the site's data, so the site neither refuses nor fails closed; it reports, and its upload
    is the new local model clipped into the preset's range (no marker)."""
    pytest.importorskip("tenseal")

    fed = make_federation(tmp_path, ["a", "b"], protocol="ckks", ckks=True)
    driver, log = fed.driver("a", task=FixedTask(1, scale=1e9))
    replies = driver.handle(round_start(1, 1, fed.digest, "ckks"), fed.fetch).replies
    assert [r.rpc for r in replies] == ["ReportUpdateReady"]
    assert not (fed.configs["a"].state_dir / FAIL_CLOSED_MARKER).exists()
    assert not log.named("fail-closed") and driver.may_start()
    _, _, values = _ckks_upload(driver, fed, 0.5)
    max_abs = driver.models.secret().preset.max_abs
    np.testing.assert_allclose(values, 0.5 * max_abs, rtol=1e-4)


def test_a_ckks_setup_gives_a_fresh_encryption_of_the_weighted_new_model(tmp_path: Path) -> None:
    pytest.importorskip("tenseal")

    fed = make_federation(tmp_path, ["a", "b"], protocol="ckks", ckks=True)
    driver, _ = fed.driver("a")
    replies = driver.handle(round_start(1, 1, fed.digest, "ckks"), fed.fetch).replies
    assert [r.rpc for r in replies] == ["ReportUpdateReady"]
    setup, upload, values = _ckks_upload(driver, fed, 0.25)
    assert upload.header.kind == pb.CKKS_CIPHERTEXT and upload.header.ckks.weight == 0.25
    want = 0.25 * (0.0 + 0.01 * (driver.site_id + 1))  # model zeros + the task's update
    np.testing.assert_allclose(values, want, atol=1e-5)
    # A setup with another context is refused: nothing is sent.
    driver2, log = fed.driver("a")
    driver2.handle(round_start(1, 2, fed.digest, "ckks"), fed.fetch)
    setup.context_sha256 = b"\x01" * 32
    bad = pb.Instruction(attempt=1, index=1, round_id=2, ckks_setup=setup)
    assert driver2.handle(bad, fed.fetch).replies == ()
    assert "context" in (log.named("policy-refused") + log.named("protocol-error"))[0]["reason"]


def test_the_real_site_privacy_bounds_the_update_by_the_rounds_clip(fed: DriverFed) -> None:
    """Central trust: the setup's DP JSON names the L2 bound; the site clips to it (over gRPC
    the JSON is the only carrier of the bound, and it is bound into the round's keys)."""
    from secure_fl.transport.privacy import CentralClip

    driver, log = fed.driver("a")  # SitePrivacy.from_config(config): the default
    driver.handle(round_start(1, 1, fed.digest), fed.fetch)
    replies = driver.handle(_dp_setup(fed, CentralClip(1e-3).to_json()), fed.fetch).replies
    assert [r.rpc for r in replies] == ["SendAdvertiseKeys"]
    (setup,) = log.named("secagg-setup")
    assert setup["l2_clipped"] is True and setup["distributed_dp"] is True
    # Without a DP JSON the same site (no floor) masks its update unclipped.
    plain, log2 = fed.driver("b")
    plain.handle(round_start(1, 1, fed.digest), fed.fetch)
    _, setups = secagg_setup(fed, 1, [1, 2, 3])
    assert plain.handle(setups[2], fed.fetch).replies
    assert log2.named("secagg-setup")[0]["l2_clipped"] is False
