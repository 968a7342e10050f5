"""The Flower node's own identity and durable memory: site JSON, provisioning, NodeSealer (state
across processes, freshness), NodeReleaseGuard (one participation, one unmasking, one model)."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr")

import numpy as np  # noqa: E402

from secure_fl.errors import ConfigError, DecryptionError, PolicyError  # noqa: E402
from secure_fl.integrations.flower.node import (  # noqa: E402
    NODE_CONFIG_KEY,
    NodeReleaseGuard,
    NodeSealer,
    load_flower_site,
    site_from_node_config,
)
from secure_fl.integrations.flower.provision import provision_flower  # noqa: E402
from secure_fl.rounds.local import make_server_round  # noqa: E402
from secure_fl.rounds.plan import plan_round  # noqa: E402
from secure_fl.rounds.policy import SitePolicy  # noqa: E402
from secure_fl.rounds.secagg import SecAggSiteRound  # noqa: E402
from secure_fl.rounds.spec import AggregationSpec  # noqa: E402
from secure_fl.transport.provision_files import load_signing_key  # noqa: E402


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_writes_private_keys_and_loadable_site_json(tmp_path: Path) -> None:
    fed = provision_flower(["a", "b", "c"], tmp_path, federation="fed")
    assert [e.site_id for e in fed.roster] == [1, 2, 3]
    assert fed.ckks_public is None and fed.ckks_fingerprint is None
    for entry in fed.roster:
        site = load_flower_site(fed.site_configs[entry.name])
        assert (site.federation, site.name, site.site_id) == ("fed", entry.name, entry.site_id)
        assert site.roster == fed.roster and site.policy == SitePolicy()
        assert site.signing_key is not None and _mode(site.signing_key) == 0o600
        assert _mode(site.state_dir) == 0o700
        assert load_signing_key(site.signing_key).public_bytes == entry.verify_key
    with pytest.raises(ConfigError, match="exists"):
        provision_flower(["a", "b"], tmp_path)


@pytest.mark.parametrize("names", [["a"], ["a", "a"], ["a", "../b"]])
def test_provision_refuses_bad_names(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(ConfigError, match="names"):
        provision_flower(names, tmp_path)


def test_site_json_errors_name_the_field(tmp_path: Path) -> None:
    fed = provision_flower(["a", "b"], tmp_path)
    path = fed.site_configs["a"]
    data = json.loads(path.read_text())
    for change, field in (
        ({"site_id": 2}, "site_id"),
        ({"extra": 1}, "extra"),
        ({"policy": {"threshold": 3}}, "threshold"),
        ({"roster": data["roster"][:1]}, "roster"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(ConfigError, match=field):
            load_flower_site(bad)
    with pytest.raises(ConfigError, match=NODE_CONFIG_KEY):
        site_from_node_config({})
    assert site_from_node_config({NODE_CONFIG_KEY: str(path)}).name == "a"


def _secagg_half(tmp_path: Path) -> tuple[SecAggSiteRound, SitePolicy, int]:
    spec = AggregationSpec.from_options("secagg", {"active": False})
    plan = plan_round(spec, {1: 1.0, 2: 1.0, 3: 1.0}, vector_length=4, round_id=77)
    setup = make_server_round(plan).setup()[1]
    policy = SitePolicy(require_active=False)
    half = SecAggSiteRound(1, policy=policy, roster={1: None, 2: None, 3: None})
    half.on_setup(setup, update=np.ones(4), reported_weight=1.0)
    return half, policy, 77


def test_node_sealer_state_survives_a_new_process_once(tmp_path: Path) -> None:
    half, policy, rid = _secagg_half(tmp_path)
    blob = half.export_state(NodeSealer(tmp_path))
    key_file = tmp_path / "flower" / "sealer.key"
    assert _mode(key_file) == 0o600 and len(key_file.read_bytes()) == 32
    assert key_file.read_bytes() not in blob
    # A fresh sealer object on the same state_dir: what the next Flower message's process has.
    restored = SecAggSiteRound.restore(
        blob, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy
    )
    assert isinstance(restored, SecAggSiteRound) and restored.client is not None
    with pytest.raises(DecryptionError):  # restored once
        SecAggSiteRound.restore(blob, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy)


def test_node_sealer_refuses_stale_and_foreign_blobs(tmp_path: Path) -> None:
    half, policy, rid = _secagg_half(tmp_path)
    old = half.export_state(NodeSealer(tmp_path))
    new = half.export_state(NodeSealer(tmp_path))
    with pytest.raises(DecryptionError):
        SecAggSiteRound.restore(old, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy)
    with pytest.raises(DecryptionError):  # another node's key
        SecAggSiteRound.restore(
            new, NodeSealer(tmp_path / "other"), site_id=1, round_id=rid, policy=policy
        )
    with pytest.raises(DecryptionError):  # another round than the host expects
        SecAggSiteRound.restore(new, NodeSealer(tmp_path), site_id=1, round_id=78, policy=policy)
    SecAggSiteRound.restore(new, NodeSealer(tmp_path), site_id=1, round_id=rid, policy=policy)


def test_node_sealer_hygiene(tmp_path: Path) -> None:
    sealer = NodeSealer(tmp_path)
    key = (tmp_path / "flower" / "sealer.key").read_bytes()
    assert key.hex() not in repr(sealer)
    with pytest.raises(TypeError):
        pickle.dumps(sealer)
    assert NodeSealer(tmp_path).open(sealer.seal(b"x", b"ad"), b"ad") == b"x"
    os.chmod(tmp_path / "flower" / "sealer.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        NodeSealer(tmp_path)


def test_release_guard_is_durable(tmp_path: Path) -> None:
    NodeReleaseGuard(tmp_path, 5, "m1").claim(5, None)
    with pytest.raises(PolicyError, match="already took part"):
        NodeReleaseGuard(tmp_path, 5, "m2").claim(5, None)
    with pytest.raises(PolicyError, match="already took part"):
        NodeReleaseGuard(tmp_path, 5, "m2").check_fresh()
    with pytest.raises(PolicyError, match="round id"):
        NodeReleaseGuard(tmp_path, 5, "m1").claim(6, None)
    NodeReleaseGuard(tmp_path, 5, "m1").contribute(5)
    NodeReleaseGuard(tmp_path, 5, "m1").claim(5, frozenset({1, 2}))
    NodeReleaseGuard(tmp_path, 5, "m1").claim(5, frozenset({1, 2}))  # the same set again
    with pytest.raises(PolicyError, match="another survivor set"):
        NodeReleaseGuard(tmp_path, 5, "m1").claim(5, frozenset({1, 3}))
    # The same global model under another round id: refused at the train stage and the unmask.
    with pytest.raises(PolicyError, match="already released"):
        NodeReleaseGuard(tmp_path, 9, "m1").check_fresh()
    guard = NodeReleaseGuard(tmp_path, 9, "m1")
    with pytest.raises(PolicyError, match="already released"):
        guard.claim(9, frozenset({1, 2}))
    assert _mode(tmp_path / "flower" / "releases.json") == 0o600


def test_site_cache_sees_an_in_place_rewrite_with_the_old_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cp -p / rsync -a --inplace / tar: same inode, same size, mtime set back to the old one.
    # Only ctime (which no system call sets) betrays the change; the cache key must hold it.
    import time

    from secure_fl.integrations.flower import node as node_module

    monkeypatch.setattr(node_module, "_SETTLED_NS", -1)  # ctime cannot be set back: settle now

    fed = provision_flower(
        ["a", "b", "c"],
        tmp_path,
        policy=SitePolicy(aggregations=("plain", "secagg+"), allow_plain=True),
    )
    path = Path(fed.site_configs["a"])
    os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    cached = load_flower_site(path)
    assert cached.policy.allow_plain and load_flower_site(path) is cached  # from the cache
    text = path.read_text()
    data = json.loads(text)
    data["policy"]["aggregations"], data["policy"]["allow_plain"] = ["secagg+"], False
    new = json.dumps(data, indent=2)
    new += " " * (len(text) - len(new))
    assert len(new) == len(text)
    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity
    with path.open("r+") as fh:
        fh.write(new)
        fh.truncate()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert after.st_ctime_ns != before.st_ctime_ns
    site = load_flower_site(path)
    assert not site.policy.allow_plain and site.policy.aggregations == ("secagg+",)
