"""Provisioning, configuration files, admission limits, tasks and checkpoints (no network)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from secure_fl.errors import ConfigError, InvalidUpdateError
from secure_fl.transport import checkpoint as ckpt
from secure_fl.transport.cli import main as cli_main
from secure_fl.transport.config import TaskSpec, load_server_config, load_site_config
from secure_fl.transport.errors import RejectedError
from secure_fl.transport.limits import SiteLimiter
from secure_fl.transport.provision import load_signing_key, provision
from secure_fl.transport.tasks import SyntheticTask, TaskResult, check_result, load_task
from secure_fl.transport.tls import fingerprint


def test_provision_writes_keys_0600_certificates_and_configs(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    assert cli_main(["provision", str(root), "--sites", "a,b,c", "--rounds", "4"]) == 0
    keys = [root / "ca" / "ca.key", root / "server" / "server.key"]
    keys += [root / "sites" / s / f for s in "abc" for f in ("site.key", "signing.key")]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((root / "sites" / "a").stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    server_cfg = load_server_config(root / "server" / "server.json")
    assert server_cfg.rounds == 4 and [e.name for e in server_cfg.roster] == ["a", "b", "c"]
    for entry in server_cfg.roster:
        pem = (root / "sites" / entry.name / "site.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca)
        assert entry.cert_sha256 == fingerprint(pem)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
        signing = load_signing_key(root / "sites" / entry.name / "signing.key")
        assert signing.public_bytes == entry.verify_key
    server_cert = x509.load_pem_x509_certificate((root / "server" / "server.crt").read_bytes())
    server_cert.verify_directly_issued_by(ca)
    site = load_site_config(root / "sites" / "b" / "site.json")
    assert site.site_id == 2 and site.tls.key == (root / "sites" / "b" / "site.key").resolve()
    # Nothing is overwritten.
    with pytest.raises(ConfigError, match="already holds a federation"):
        provision(root, ["a", "b"])
    assert cli_main(["provision", str(root), "--sites", "a,b"]) == 2


@pytest.mark.parametrize(
    ("sites", "words"),
    [
        (["a"], "at least 2"),
        (["a", "a"], "repeat"),
        (["a", "b/c"], "must match"),
        (["a", ".b"], "must match"),
    ],
)
def test_provision_refuses_bad_site_names(tmp_path: Path, sites: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        provision(tmp_path / "f", sites)


def _server_json(tmp_path: Path) -> Path:
    done = provision(tmp_path / "fed", ["a", "b"])
    return done.server_config


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"rounds": 0}, "rounds"),
        ({"min_sites": 3}, "min_sites"),
        ({"typo": 1}, "unknown keys"),
        ({"aggregation": {"protocol": "rot13"}}, "aggregation.protocol"),
        ({"aggregation": {"bits": 16}}, "aggregation.bits"),
        ({"deadlines": {"phase_s": -1}}, "deadlines.phase_s"),
        ({"limits": {"chunk_bytes": 10_000_000}}, "limits.chunk_bytes"),
        ({"limits": {"burst": "many"}}, "limits.burst"),
        ({"model": {"shapes": [[0]]}}, "model.shapes"),
        ({"insecure_test_seed": "x"}, "insecure_test_seed"),
    ],
)
def test_server_config_errors_name_the_field(tmp_path: Path, patch: dict, words: str) -> None:
    path = _server_json(tmp_path)
    config = json.loads(path.read_text())
    config.update(patch)
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=words):
        load_server_config(path)


def test_site_config_has_no_test_hooks(tmp_path: Path) -> None:
    """The self-kill switch is an injected hook (SiteRunner(crash_hook=...)), never a config key:
    a config carrying one is refused."""
    from secure_fl.transport.site import SiteRunner

    done = provision(tmp_path / "fed", ["a", "b"])
    path = done.site_configs["a"]
    config = json.loads(path.read_text())
    config["test_crash_before"] = "masked_input"
    config["insecure_test_seed"] = 1
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unknown keys.*test_crash_before"):
        load_site_config(path)
    del config["test_crash_before"]
    path.write_text(json.dumps(config))
    calls: list[tuple[str, int]] = []
    runner = SiteRunner(load_site_config(path), crash_hook=lambda p, r: calls.append((p, r)))
    runner.driver._crash_point("unmask", 7)
    assert calls == [("unmask", 7)]
    SiteRunner(load_site_config(path)).driver._crash_point("unmask", 7)  # no hook: nothing happens
    config["name"] = "zed"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not on the roster"):
        load_site_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_site_config(tmp_path / "missing.json")


def test_ckks_aggregation_needs_the_public_context(tmp_path: Path) -> None:
    # CKKS rounds are wired (tests/transport/test_transport_ckks.py); without the provisioned
    # public context (the "ckks" section) the server refuses to start.
    from secure_fl.transport.server import FederationServer

    path = _server_json(tmp_path)
    config = json.loads(path.read_text())
    config["aggregation"]["protocol"] = "ckks"
    config.pop("ckks", None)
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="ckks"):
        FederationServer(load_server_config(path))


def test_limiter_rate_and_concurrency() -> None:
    now = [0.0]
    limiter = SiteLimiter(rate_per_s=1.0, burst=2, concurrency=1, clock=lambda: now[0])
    with limiter.admit("a"):
        with pytest.raises(RejectedError, match="in flight") as info, limiter.admit("a"):
            pass
        assert info.value.code == "RESOURCE_EXHAUSTED"
        with limiter.admit("b"):  # another site is not affected
            pass
    with limiter.admit("a"):
        pass
    with pytest.raises(RejectedError, match="calls per second"), limiter.admit("a"):
        pass
    now[0] += 1.0  # one token back
    with limiter.admit("a"):
        pass


def test_synthetic_task_is_deterministic_and_checked() -> None:
    model = {"w": np.zeros((3, 2), np.float32), "b": np.ones(4, np.float32)}
    one = SyntheticTask("x", seed=3).compute_update(model, 2)
    two = SyntheticTask("x", seed=3).compute_update(model, 2)
    other = SyntheticTask("y", seed=3).compute_update(model, 2)
    assert one.weight == two.weight and all(
        np.array_equal(one.update[k], two.update[k]) for k in model
    )
    assert not np.array_equal(one.update["w"], other.update["w"])
    assert one.update["w"].dtype == np.float32
    check_result(one, model)
    with pytest.raises(InvalidUpdateError, match="names, order"):
        check_result(TaskResult(update={"w": one.update["w"]}, weight=1.0), model)
    with pytest.raises(InvalidUpdateError, match="weight"):
        check_result(TaskResult(update=one.update, weight=0.0), model)
    assert isinstance(load_task(TaskSpec(options={"seed": 1}), "x"), SyntheticTask)
    with pytest.raises(ConfigError, match="options"):
        load_task(TaskSpec(options={"nope": 1}), "x")
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_task(TaskSpec(kind="python", factory="no.such.module:make"), "x")
    task = load_task(
        TaskSpec(
            kind="python", factory="secure_fl.transport.tasks:SyntheticTask", options={"seed": 4}
        ),
        "x",
    )
    assert isinstance(task, SyntheticTask) and task.seed == 4


def test_checkpoint_round_trip_and_integrity(tmp_path: Path) -> None:
    model = {"w": np.arange(6, dtype=np.float32)}
    blob, digest = ckpt.model_blob(model)
    state = ckpt.Checkpoint("fed", 2, model, digest, history=({"round": 0}, {"round": 1}))
    ckpt.save(tmp_path, state, blob)
    back = ckpt.load(tmp_path, "fed")
    assert back is not None and back.completed_rounds == 2 and back.ledger is None
    assert np.array_equal(back.model["w"], model["w"]) and len(back.history) == 2
    assert stat.S_IMODE((tmp_path / "checkpoint.json").stat().st_mode) == 0o600
    assert ckpt.load(tmp_path / "none", "fed") is None
    with pytest.raises(ConfigError, match="belongs to federation"):
        ckpt.load(tmp_path, "other")
    model_file = tmp_path / "model-000002.tensors"
    model_file.write_bytes(blob[:-4] + b"\x00" * 4)
    with pytest.raises(ConfigError, match="SHA-256"):
        ckpt.load(tmp_path, "fed")
    # A newer checkpoint replaces the older model file.
    ckpt.save(tmp_path, ckpt.Checkpoint("fed", 3, model, digest), blob)
    assert sorted(p.name for p in tmp_path.glob("model-*")) == ["model-000003.tensors"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert os.access(tmp_path / "checkpoint.json", os.R_OK)


def test_provision_writes_ckks_artefacts_when_available(tmp_path: Path) -> None:
    pytest.importorskip("tenseal")
    from secure_fl.transport.provision import ckks_provisioner

    if ckks_provisioner() is None:
        pytest.skip("secure_fl.he offers no provisioner")
    done = provision(tmp_path / "fed", ["a", "b"], ckks=True)
    server = load_server_config(done.server_config)
    assert server.ckks is not None and server.ckks.context.name == "ckks-public.ctx"
    for name in ("a", "b"):
        site = load_site_config(done.site_configs[name])
        assert site.ckks is not None and site.ckks.fingerprint == server.ckks.fingerprint
        assert stat.S_IMODE(site.ckks.context.stat().st_mode) == 0o600
    assert not (done.server_config.parent / "ckks-secret.ctx").exists()  # never on the server


def test_provision_without_ckks(tmp_path: Path) -> None:
    done = provision(tmp_path / "fed", ["a", "b"], ckks=False)
    assert load_server_config(done.server_config).ckks is None
    assert not (tmp_path / "fed" / "ckks").exists()


class _Context:
    def __init__(self, pems: list[bytes]) -> None:
        self._pems = pems

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": self._pems} if self._pems else {}


def test_authenticator_checks_roster_usage_and_pin(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from secure_fl.transport.config import RosterEntry
    from secure_fl.transport.provision import _issue, _name, issue_site_certificate
    from secure_fl.transport.tls import Authenticator

    root = tmp_path / "fed"
    provision(root, ["a", "b"], ckks=False)
    ca = x509.load_pem_x509_certificate((root / "ca" / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((root / "ca" / "ca.key").read_bytes(), None)
    roster = load_server_config(root / "server" / "server.json").roster
    auth = Authenticator(roster)
    pem_a = (root / "sites" / "a" / "site.crt").read_bytes()
    assert auth.identify(_Context([pem_a])).name == "a"
    assert auth.identify(_Context([pem_a])).site_id == 1  # cached

    def refused(pems: list[bytes], code: str, words: str, authn: Authenticator = auth) -> None:
        with pytest.raises(RejectedError, match=words) as info:
            authn.identify(_Context(pems))
        assert info.value.code == code

    refused([], "UNAUTHENTICATED", "required")
    refused([b"garbage"], "UNAUTHENTICATED", "parsed")
    other, _ = issue_site_certificate(ca, key, "mallory", "fed")
    refused([other], "PERMISSION_DENIED", "not on the roster")
    reissued, _ = issue_site_certificate(ca, key, "a", "fed")
    refused([reissued], "PERMISSION_DENIED", "pinned")
    # A certificate for server authentication only, under a roster name (no pin): refused.
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    server_only = _issue(
        subject=_name("b", "fed"),
        public_key=k.public_key(),
        issuer=ca.subject,
        issuer_key=key,
        days=1,
        ca=False,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        san=None,
    ).public_bytes(serialization.Encoding.PEM)
    unpinned = Authenticator(tuple(RosterEntry(e.name, e.site_id) for e in roster))
    refused([server_only], "PERMISSION_DENIED", "client authentication", unpinned)
    assert unpinned.identify(_Context([reissued])).name == "a"


def test_site_refuses_a_second_unmask_with_another_survivor_set(tmp_path: Path) -> None:
    from secure_fl.errors import RemoteProtocolError
    from secure_fl.rounds.checks import check_roster
    from secure_fl.secagg import make_config
    from secure_fl.transport.site import SiteRunner

    done = provision(tmp_path / "fed", ["a", "b", "c"], ckks=False)
    config = load_site_config(done.site_configs["a"])
    runner = SiteRunner(config)
    config.state_dir.mkdir(parents=True)
    guard = runner.driver.unmask_guard
    guard.check_and_record(4, frozenset({1, 2, 3}))
    guard.check_and_record(4, frozenset({1, 2, 3}))  # the same set again: nothing new revealed
    guard.check_and_record(5, frozenset({1, 2}))
    with pytest.raises(RemoteProtocolError, match="another survivor set"):
        guard.check_and_record(4, frozenset({1, 2}))
    with pytest.raises(RemoteProtocolError, match="another survivor set"):
        SiteRunner(config).driver.unmask_guard.check_and_record(4, frozenset({1, 3}))  # restart
    # The round configuration is checked against the provisioned roster.
    roster = {e.site_id: e.verify_key for e in config.roster}
    keys = {e.site_id: e.verify_key for e in config.roster}
    good = make_config(
        [1, 2, 3], vector_length=3, bits=32, threshold=2, active=True, verify_keys=keys
    )
    check_roster(good, config.site_id, roster)
    forged = {**keys, 2: b"\x07" * 32}
    bad = make_config(
        [1, 2, 3], vector_length=3, bits=32, threshold=2, active=True, verify_keys=forged
    )
    with pytest.raises(RemoteProtocolError, match="verification key of site 2"):
        check_roster(bad, config.site_id, roster)
    stranger = make_config([1, 2, 9], vector_length=3, bits=32, threshold=2)
    with pytest.raises(RemoteProtocolError, match="not on the roster"):
        check_roster(stranger, config.site_id, roster)


def test_provision_task_unet_writes_the_unet_task_and_initial_model(tmp_path: Path) -> None:
    """`provision --task unet` gives every site the 3D-UNet task with its own datalist and the
    server the initial model; the policy pins that model's length; nothing to edit by hand."""
    pytest.importorskip("monai")
    from secure_fl.data import generate_federation
    from secure_fl.transport import rounds
    from secure_fl.transport.provision import INITIAL_MODEL, UNET_FACTORY

    datalist = generate_federation(tmp_path / "data", sites=2, shape=(24, 24, 24))
    root = tmp_path / "fed"
    argv = ["provision", str(root), "--sites", "site-A,site-B", "--no-ckks"]
    argv += ["--task", "unet", "--datalist-template", str(tmp_path / "nowhere" / "{site}.json")]
    argv += ["--site-datalist", f"site-B={datalist}", "--grid", "16,16,16", "--patch", "16,16,16"]
    argv += ["--channels", "4,8", "--rounds", "2"]
    assert cli_main(argv) == 0
    server = load_server_config(root / "server" / "server.json")
    assert server.model.path == (root / "server" / INITIAL_MODEL).resolve()
    model = rounds.initial_model(server.model)
    size = rounds.model_size(model)
    site_a = load_site_config(root / "sites" / "site-A" / "site.json")
    site_b = load_site_config(root / "sites" / "site-B" / "site.json")
    assert site_a.task.kind == "python" and site_a.task.factory == UNET_FACTORY
    assert site_a.task.options["datalist"] == str(tmp_path / "nowhere" / "site-A.json")
    assert site_b.task.options["datalist"] == str(datalist)  # NAME=PATH wins over the template
    assert site_b.task.options["channels"] == [4, 8] and site_b.task.options["rounds"] == 2
    assert site_a.policy.vector_length == site_b.policy.vector_length == size
    # The site's task builds the same architecture as the server's initial model.
    task = load_task(site_b.task, "site-B")
    local = task.trainer.get_weights().weights  # type: ignore[attr-defined]
    assert list(local) == list(model)
    assert all(local[k].shape == model[k].shape for k in model)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ([], "no datalist for site"),
        (["--site-datalist", "a"], "NAME=PATH"),
        (["--site-datalist", "zz=/d.json"], "not in --sites"),
        (["--site-datalist", "a=/1.json", "--site-datalist", "a=/2.json"], "twice"),
        (["--datalist-template", "/d/{site}.json", "--grid", "16,16"], "grid must be 3"),
        (["--datalist-template", "/d/{site}.json", "--grid", "8,8,8"], "must fit in grid"),
        (["--datalist-template", "/d/{site}.json", "--channels", "16,x"], "comma-separated"),
    ],
)
def test_provision_task_unet_refuses_bad_options_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    root = tmp_path / "fed"
    assert cli_main(["provision", str(root), "--sites", "a,b", "--task", "unet", *extra]) == 2
    assert words in capsys.readouterr().err
    assert not root.exists()


def test_provision_datalist_options_need_task_unet(tmp_path: Path) -> None:
    argv = ["provision", str(tmp_path / "f"), "--sites", "a,b", "--datalist-template", "x"]
    assert cli_main(argv) == 2
    assert not (tmp_path / "f").exists()


class _RecordingLog:
    """Stands in for :class:`secure_fl.transport.logs.EventLog`: keeps (event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def _add(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))

    def debug(self, event: str, **fields: object) -> None:
        self._add(event, **fields)

    def info(self, event: str, **fields: object) -> None:
        self._add(event, **fields)

    def warning(self, event: str, **fields: object) -> None:
        self._add(event, **fields)

    def error(self, event: str, exc: bool = False, **fields: object) -> None:
        self._add(event, **fields)


def test_server_logs_number_rounds_from_1_and_give_the_round_id_apart(tmp_path: Path) -> None:
    """A person reads `round` (the federation round, from 1); `round_id` is the protocol's id,
    fresh per attempt, so after retries the two differ (here: second round, id 6)."""
    import dataclasses

    from secure_fl.transport.coordinator import drive
    from secure_fl.transport.server import FederationServer

    done = provision(tmp_path / "fed", ["a", "b"], ckks=False)
    config = load_server_config(done.server_config)
    config = dataclasses.replace(
        config, deadlines=dataclasses.replace(config.deadlines, update_s=0.01)
    )
    config.state_dir.mkdir(parents=True)
    log = _RecordingLog()
    server = FederationServer(config, log=log)  # type: ignore[arg-type]
    server._completed = 1  # the first round is done; failed attempts used ids 1..5
    for _ in range(5):
        server._new_round_id()
    coord, now = server._coord, 100.0  # driven without sockets, with a fake clock
    for site in (1, 2):
        coord.join(site, now)
    drive(coord, now)  # both sites live: the attempt starts
    drive(coord, now + 1.0)  # nobody reports before the deadline: the attempt fails
    assert coord.completed == 1 and coord.current is None
    fields = {event: f for event, f in log.events if event in ("round-start", "round-failed")}
    assert set(fields) == {"round-start", "round-failed"}, log.events
    for event, f in fields.items():
        assert (f["round"], f["round_id"]) == (2, 6), (event, f)
    record = json.loads((config.state_dir / "rounds" / "round-000001-failed-1.json").read_text())
    assert (record["round"], record["round_id"]) == (1, 6)  # the record keeps the 0-based index
