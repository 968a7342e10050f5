"""Regression tests of the attacker review of the gRPC site (issue 11): a CKKS model served to a
round of another aggregation (a7), a noise floor without require_dp and the site's own count of
DP rounds (a4), hostile JSON in server instructions (a12), and the fail-closed marker's details
(a9). Sans-IO: the site driver with a scripted server."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from site_driver_helpers import (
    TO_WIRE,
    DriverFed,
    FixedTask,
    from_wire,
    make_federation,
    round_start,
    secagg_setup,
)

from secure_fl.errors import ConfigError, PolicyError
from secure_fl.rounds import protobuf
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.secagg import SecAggServerRound
from secure_fl.rounds.spec import AggregationSpec
from secure_fl.transport import policy as site_policy
from secure_fl.transport import tensors
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import SitePolicy, load_site_config
from secure_fl.transport.privacy import CentralClip, SitePrivacy
from secure_fl.transport.provision import provision
from secure_fl.transport.rounds import sha256
from secure_fl.transport.site_dp import DP_RECORD, DPRoundRecord
from secure_fl.transport.site_driver import FAIL_CLOSED_MARKER, FailClosedError
from secure_fl.transport.site_round import parse_round_config
from secure_fl.transport.tasks import TaskResult

# -- a7: the encrypted CKKS model in a round announced as secagg ----------------------------------


class _EvalTask(FixedTask):
    """Reports a metric of the global model it is given (a validation score, say)."""

    def compute_update(
        self, global_model: Mapping[str, np.ndarray], round_id: int, round_config: Any = None
    ) -> TaskResult:
        result = super().compute_update(global_model, round_id, round_config)
        flat = np.concatenate([np.asarray(v, np.float64).ravel() for v in global_model.values()])
        return dataclasses.replace(result, metrics={"first": float(flat[0])}, metric_samples=3)


def _encrypted_model(fed: DriverFed, secret: Any, *, share: float = 1.0) -> bytes:
    """The encrypted global model after round 0 (two contributors), as a server serves it."""
    from secure_fl.he import Layout, SiteEncryptor
    from secure_fl.he.wire import KIND_SUM, decode_frame, encode_frame
    from secure_fl.transport import ckks as ckks_wire

    structure = ckks_wire.structure_of(fed.model)
    size = ckks_wire.structure_size(structure)
    hidden = 0.3 * np.random.default_rng(1).standard_normal(size)
    layout = Layout(size, secret.preset.slots, 64)
    raw = SiteEncryptor(secret, layout).stream(hidden, factor=1.0, round_id=0)
    frames = tuple(
        encode_frame(
            kind=KIND_SUM,
            fingerprint=f.fingerprint,
            round_id=f.round_id,
            chunk=f.chunk,
            values=f.values,
            contributors=2,
            blobs=list(f.blobs),
        )
        for f in map(decode_frame, raw)
    )
    return ckks_wire.encode_model(
        ckks_wire.EncryptedModel(
            fingerprint=secret.fingerprint,
            round_id=0,
            share=share,
            contributors=2,
            chunk_ciphertexts=64,
            structure=structure,
            frames=frames,
        )
    )


def _ckks_fed(tmp_path: Path) -> DriverFed:
    pytest.importorskip("tenseal")
    fed = make_federation(tmp_path, ["a", "b"], protocol="ckks", ckks=True)
    config = fed.configs["a"]  # the default policy: secagg, secagg+ and ckks
    fed.configs["a"] = dataclasses.replace(config, policy=SitePolicy())
    return fed


def test_an_encrypted_model_in_a_secagg_round_is_refused_before_decryption(
    tmp_path: Path,
) -> None:
    fed = _ckks_fed(tmp_path)
    task = _EvalTask(1)
    driver, log = fed.driver("a", task=task)
    served = _encrypted_model(fed, driver.models.secret())
    step = driver.handle(round_start(1, 1, sha256(served), "secagg"), lambda _: served)
    assert step.replies == ()  # no metrics, no weight: nothing of the round is sent
    assert task.calls == [] and not driver.models.decrypted
    assert not log.named("ckks-model-decrypted")
    assert "not a CKKS round" in log.named("protocol-error")[0]["reason"]


def test_a_decrypted_model_held_from_a_ckks_round_is_not_reused_by_a_secagg_round(
    tmp_path: Path,
) -> None:
    fed = _ckks_fed(tmp_path)
    task = _EvalTask(1)
    driver, log = fed.driver("a", task=task)
    served = _encrypted_model(fed, driver.models.secret())
    replies = driver.handle(round_start(1, 1, sha256(served), "ckks"), lambda _: served).replies
    # In the CKKS round the metrics of the decrypted model are withheld; only the weight goes.
    assert [r.rpc for r in replies] == ["ReportUpdateReady"] and log.named("metrics-withheld")
    assert driver.models.decrypted and len(task.calls) == 1

    def no_fetch(digest: bytes) -> bytes:
        raise AssertionError("the model is held already")

    step = driver.handle(round_start(2, 2, sha256(served), "secagg"), no_fetch)
    assert step.replies == () and len(task.calls) == 1
    assert "not a CKKS round" in log.named("protocol-error")[-1]["reason"]


# -- a4: a noise floor implies require_dp; the site's own DP-round budget -------------------------


def test_a_noise_floor_or_a_dp_budget_implies_require_dp() -> None:
    for policy in (SitePolicy(min_noise_multiplier=1.0), SitePolicy(max_dp_rounds=3)):
        assert policy.require_dp is True and site_policy.dp_required(policy)
        privacy = SitePrivacy(policy, roster_size=5)
        for text in ("", CentralClip(1.0).to_json()):
            with pytest.raises(PolicyError, match="require_dp"):
                privacy.check(text)
        with pytest.raises(PolicyError, match="require_dp"):
            site_policy.check_privacy_floor(policy, "ckks")
    assert not site_policy.dp_required(SitePolicy())
    with pytest.raises(ConfigError, match="max_dp_rounds"):
        SitePolicy(max_dp_rounds=0)


def test_the_loader_refuses_a_floor_beside_require_dp_false(tmp_path: Path) -> None:
    done = provision(tmp_path / "fed", ["a", "b"], ckks=False)
    path = done.site_configs["a"]
    data = json.loads(path.read_text())
    base = dict(data.get("policy") or {})
    base.pop("require_dp", None)
    data["policy"] = {**base, "min_noise_multiplier": 1.0}
    path.write_text(json.dumps(data))
    loaded = load_site_config(path).policy
    assert loaded.require_dp is True and loaded.min_noise_multiplier == 1.0
    data["policy"] = {**base, "max_dp_rounds": 2, "require_dp": False}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"require_dp is false but policy\.max_dp_rounds"):
        load_site_config(path)


class _StubPrivacy:
    """A SitePrivacy stand-in that accepts any JSON as a DP configuration, noise added by no one
    (the budget, not the noise, is under test)."""

    def check(self, text: str) -> Any:
        if not text:
            return None
        cfg = json.loads(text)
        return dataclasses.make_dataclass("Cfg", ["clip", "noise_multiplier", "mechanism"])(**cfg)

    def noise_hook(self, cfg: Any) -> Any:
        return lambda values, setup: values


DP_JSON = json.dumps({"clip": 100.0, "noise_multiplier": 1.5, "mechanism": "test"})


def _dp_setups(fed: DriverFed, round_id: int, ids: list[int]) -> tuple[Any, dict[int, Any]]:
    roster = fed.configs["a"].roster
    keys = {e.site_id: e.verify_key for e in roster if e.site_id in ids and e.verify_key}
    size = sum(int(v.size) for v in fed.model.values())
    plan = plan_round(
        AggregationSpec("secagg+", l2_clip=100.0),  # the DP JSON's clip, as an honest server
        {s: 10.0 * s for s in ids},
        vector_length=size,
        round_id=round_id,
        verify_keys=keys,
        extra_binding=DP_JSON.encode(),
    )
    server = SecAggServerRound(plan)
    insts = {
        s: pb.Instruction(
            attempt=round_id, index=1, round_id=round_id, secagg_setup=protobuf.setup_to_pb(m)
        )
        for s, m in server.setup().items()
    }
    return server, insts


def _run_secagg(
    drivers: dict[int, Any],
    fed: DriverFed,
    round_id: int,
    *,
    withhold: Callable[[str, int], bool] = lambda kind, site: False,
) -> Any:
    """One scripted DP round among ``drivers``; ``withhold(kind, site)`` drops the server's
    instructions of that kind to that site (a server that skips a phase for one site)."""
    server, setups = _dp_setups(fed, round_id, sorted(drivers))
    pending = {s: [setups[s]] for s in drivers}
    index = 1
    while True:
        for site, insts in pending.items():
            for inst in insts:
                for reply in drivers[site].handle(inst, fed.fetch).replies:
                    server.receive(site, from_wire(reply, site))
        out = server.close()
        if server.done:
            return server.outcome()
        index += 1
        pending = {}
        for site, message in out.items():
            kind, to_pb = TO_WIRE[type(message)]
            if withhold(kind, site):
                continue
            inst = pb.Instruction(attempt=round_id, index=index, round_id=round_id)
            getattr(inst, kind).CopyFrom(to_pb(message))
            pending[site] = [inst]


def test_a_site_records_its_dp_rounds_and_refuses_past_its_budget(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, ["a", "b", "c"], ckks=False)
    for name, config in fed.configs.items():
        policy = dataclasses.replace(config.policy, max_dp_rounds=1)
        fed.configs[name] = dataclasses.replace(config, policy=policy)
    pairs = {c.site_id: fed.driver(n, privacy=_StubPrivacy()) for n, c in fed.configs.items()}
    drivers = {s: d for s, (d, _) in pairs.items()}
    for d in drivers.values():
        assert d.handle(round_start(1, 1, fed.digest), fed.fetch).replies
    outcome = _run_secagg(drivers, fed, 1)
    assert outcome.survivors == frozenset(drivers)
    for d in drivers.values():
        path = d.config.state_dir / DP_RECORD
        (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
        assert entry["round_id"] == 1 and entry["survivors"] == sorted(drivers)
        assert entry["noise_multiplier"] == 1.5 and entry["clip"] == 100.0
        assert entry["mechanism"] == "test" and entry["federation"] == d.config.federation
    # Round 2: a new model, a fresh round id; the budget of one DP round is spent.
    driver, log = pairs[1]
    blob = tensors.dumps({k: v + 1.0 for k, v in fed.model.items()})
    assert driver.handle(round_start(2, 2, sha256(blob)), lambda _: blob).replies
    _, setups = _dp_setups(fed, 2, sorted(drivers))
    assert driver.handle(setups[1], fed.fetch).replies == ()
    assert "max_dp_rounds=1" in log.named("policy-refused")[-1]["reason"]


def test_the_dp_record_is_hash_chained_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / DP_RECORD
    record = DPRoundRecord(path, "fed", max_rounds=2)
    dp = {"mechanism": "m", "noise_multiplier": 1.0, "effective_noise_multiplier": 1.0, "clip": 1.0}
    record.claim(1, {1, 2, 3}, dp)
    record.claim(1, {1, 2, 3}, dp)  # the same round again: recorded once
    record.claim(2, {1, 2}, dp)
    assert record.rounds() == frozenset({1, 2})
    record.check_room(2)  # a recorded round does not count twice
    with pytest.raises(PolicyError, match="max_dp_rounds=2"):
        record.check_room(3)
    assert DPRoundRecord(path, "other", max_rounds=1).rounds() == frozenset()
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0]]) + "\n")  # reordered: the chain breaks
    with pytest.raises(ConfigError, match="hash chain"):
        record.rounds()
    entry = json.loads(lines[0])
    entry["survivors"] = [1]  # edited
    path.write_text(json.dumps(entry) + "\n" + lines[1] + "\n")
    with pytest.raises(ConfigError, match="hash chain"):
        record.check_room(5)


# -- a12: hostile JSON in server instructions ------------------------------------------------------


def test_bounded_json_refuses_deep_or_long_text_before_parsing() -> None:
    with pytest.raises(ValueError, match="nests arrays/objects more than 32 deep"):
        site_policy.bounded_json("[" * 20_000 + "]" * 20_000, "f")
    with pytest.raises(ValueError, match="at most 65536"):
        site_policy.bounded_json(json.dumps({"k": "x" * 70_000}), "f")
    # Brackets inside strings (escaped quotes included) are not nesting.
    text = json.dumps({"k": '\\"[[[[' * 40, "a": [[1]]})
    assert site_policy.bounded_json(text, "f") == json.loads(text)
    with pytest.raises(Exception, match="round_config_json nests"):
        parse_round_config("{" + '"a":{' * 40 + "}" * 41)


def test_deeply_nested_json_refuses_the_round_and_the_site_goes_on(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, ["a", "b", "c", "d"], protocol="secagg+", ckks=False)
    driver, log = fed.driver("a")
    assert driver.handle(round_start(1, 1, fed.digest), fed.fetch).replies
    _, insts = secagg_setup(fed, 1, [1, 2, 3, 4])
    insts[1].secagg_setup.distributed_dp_json = "[" * 20_000 + "]" * 20_000
    assert driver.handle(insts[1], fed.fetch).replies == ()
    assert "nests" in log.named("policy-refused")[-1]["reason"]
    deep = round_start(2, 2, fed.digest, round_config_json="[" * 20_000 + "]" * 20_000)
    assert driver.handle(deep, fed.fetch).replies == ()
    assert "nests" in log.named("protocol-error")[-1]["reason"]


class _ExplodingPrivacy(_StubPrivacy):
    def check(self, text: str) -> Any:
        raise RecursionError("maximum recursion depth exceeded")


def test_an_unexpected_error_refuses_only_the_round_but_fail_closed_stops(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, ["a", "b", "c"], ckks=False)
    driver, log = fed.driver("a", privacy=_ExplodingPrivacy())
    assert driver.handle(round_start(1, 1, fed.digest), fed.fetch).replies
    _, setups = secagg_setup(fed, 1, [1, 2, 3])
    assert driver.handle(setups[1], fed.fetch).replies == ()
    (error,) = log.named("round-error")
    assert error["error"] == "RecursionError" and driver.round is not None and driver.round.failed

    def fail(*args: Any, **kwargs: Any) -> Any:
        driver._fail_closed("a check on secret values failed")

    driver._on_secagg_setup = fail  # type: ignore[method-assign]
    # The site goes on: the next round starts normally.
    assert driver.handle(round_start(2, 2, fed.digest), lambda _: fed.blob).replies
    _, setups = secagg_setup(fed, 2, [1, 2, 3])
    setups[1].attempt = 2
    with pytest.raises(FailClosedError):
        driver.handle(setups[1], fed.fetch)


# -- a9: the fail-closed marker names what an operator needs --------------------------------------


def test_the_fail_closed_marker_names_the_round_model_and_contributors(tmp_path: Path) -> None:
    fed = _ckks_fed(tmp_path)
    driver, log = fed.driver("a")
    # A tiny share: the decrypted mean is far beyond the preset's range (as when one site
    # encrypted values at max_abs): every honest site fails closed.
    served = _encrypted_model(fed, driver.models.secret(), share=1e-9)
    with pytest.raises(FailClosedError):
        driver.handle(round_start(1, 1, sha256(served), "ckks"), lambda _: served)
    marker = json.loads((fed.configs["a"].state_dir / FAIL_CLOSED_MARKER).read_text())
    assert marker["round_id"] == 1 and marker["model_round_id"] == 0
    assert marker["model_sha256"] == sha256(served).hex() and marker["contributors"] == 2
    assert log.named("fail-closed")[0]["contributors"] == 2
