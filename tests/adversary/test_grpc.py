"""A malicious server over real gRPC: every site holds to its own policy.

The server and the sites run in this process (a :class:`FederationServer` and
:class:`SiteRunner` threads) over mutual TLS on loopback. The server lies: through its config
(the operator asks for ``plain``, a low threshold, the semi-honest variant, a model of another
size) or through a subclass / a patched conversion (a forged vector length, a reused round id, the
same model in two rounds). Each test asserts what the server *received* (a spy on its handlers)
and what the site logged: a refused round leaves the site without sending anything for it, with
a WARNING that says why.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secure_fl.rounds import protobuf as rounds_pb
from secure_fl.transport import convert
from secure_fl.transport.config import (
    RosterEntry,
    ServerConfig,
    SiteConfig,
    load_server_config,
    load_site_config,
)
from secure_fl.transport.provision import issue_site_certificate, provision
from secure_fl.transport.server import FederationServer
from secure_fl.transport.site import EXIT_NOT_TRAINED, SiteRunner

SERVICE = "secure_fl.federation.v1.Federation"


class SpyServer(FederationServer):
    """An honest server that records every authenticated call: (method, site name)."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self.calls: list[tuple[str, str]] = []
        self._calls_lock = threading.Lock()

    def _note(self, method: str, entry: RosterEntry) -> None:
        with self._calls_lock:
            self.calls.append((method, entry.name))

    def _guard_unary(self, method: str, fn: Any) -> Any:  # type: ignore[override]
        def spied(entry: RosterEntry, raw: bytes, context: grpc.ServicerContext) -> Any:
            self._note(method, entry)
            return fn(entry, raw, context)

        return super()._guard_unary(method, spied)

    def _guard_stream(self, method: str, fn: Any) -> Any:  # type: ignore[override]
        def spied(entry: RosterEntry, stream: Iterator[bytes], context: Any) -> Any:
            self._note(method, entry)
            return fn(entry, stream, context)

        return super()._guard_stream(method, spied)

    def sent(self, *methods: str) -> list[tuple[str, str]]:
        with self._calls_lock:
            return [c for c in self.calls if c[0] in methods]


# Every call a site makes that carries something derived from its data.
DATA_CALLS = (
    "ReportUpdateReady",
    "UploadUpdate",
    "SendAdvertiseKeys",
    "SendShareKeys",
    "UploadMaskedInput",
    "SendConsistencySignature",
    "SendUnmaskResponse",
    "UploadCiphertext",
)
SECAGG_CALLS = DATA_CALLS[2:7]


@dataclasses.dataclass
class Run:
    server: SpyServer
    server_status: int
    site_status: dict[str, int]
    logs: dict[str, list[dict[str, Any]]]

    def warnings(self, name: str, event: str = "policy-refused") -> list[str]:
        return [
            str(e.get("reason", ""))
            for e in self.logs[name]
            if e["level"] == "warning" and e["event"] == event
        ]

    def records(self) -> list[dict[str, Any]]:
        folder = self.server.config.state_dir / "rounds"
        return [json.loads(p.read_text()) for p in sorted(folder.glob("round-*.json"))]


class Fed:
    """A provisioned federation whose parties run in this process."""

    def __init__(
        self,
        root: Path,
        names: list[str],
        *,
        protocol: str = "secagg",
        rounds: int = 1,
        aggregation: Mapping[str, Any] | None = None,
        shapes: list[list[int]] | None = None,
    ) -> None:
        self.root = root
        self.names = names
        done = provision(
            root,
            names,
            rounds=rounds,
            protocol=protocol,
            listen="127.0.0.1:0",
            ckks=False,
            model_shapes=shapes or [[3, 2]],
            dropout_rate=float((aggregation or {}).get("dropout_rate", 0.1)),
        )
        server = json.loads(done.server_config.read_text())
        server["aggregation"].update(aggregation or {})
        server["insecure_test_seed"] = 5
        server["max_attempts"] = 1
        server["deadlines"] = {
            "wait_for_sites_s": 20.0,
            "update_s": 2.0,
            "phase_s": 2.0,
            "liveness_s": 30.0,
            "poll_wait_s": 0.3,
            "linger_s": 1.0,
        }
        done.server_config.write_text(json.dumps(server))
        self.server_json = done.server_config
        self.site_json = done.site_configs

    def patch_server(self, **values: Any) -> None:
        config = json.loads(self.server_json.read_text())
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        self.server_json.write_text(json.dumps(config))

    def site_config(self, name: str) -> SiteConfig:
        config = load_site_config(self.site_json[name])
        return dataclasses.replace(
            config, log_file=self.root / "logs" / f"{name}.jsonl", reconnect_timeout_s=20.0
        )

    def run(self, server_class: Callable[[ServerConfig], SpyServer] = SpyServer) -> Run:
        server = server_class(load_server_config(self.server_json))
        server.start()
        status: dict[str, int] = {}
        threads = []
        try:
            for name in self.names:
                config = dataclasses.replace(self.site_config(name), server=server.address)
                runner = SiteRunner(config)

                def work(runner: SiteRunner = runner, name: str = name) -> None:
                    status[name] = runner.run()

                thread = threading.Thread(target=work, name=f"site-{name}", daemon=True)
                thread.start()
                threads.append(thread)
            server_status = server.wait(timeout=60)
            for thread in threads:
                thread.join(timeout=30)
        finally:
            server.stop()
        logs = {}
        for name in self.names:
            path = self.root / "logs" / f"{name}.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            logs[name] = [json.loads(line) for line in lines]
        return Run(server, server_status, status, logs)


@pytest.fixture
def fed(tmp_path: Path) -> Callable[..., Fed]:
    count = iter(range(100))

    def make(names: list[str], **kwargs: Any) -> Fed:
        return Fed(tmp_path / f"fed{next(count)}", names, **kwargs)

    return make


def assert_refused(run: Run, words: str, calls: tuple[str, ...] = SECAGG_CALLS) -> None:
    """No site sent any of ``calls``, each logged a policy refusal with ``words``, the round
    failed and, with nothing trained, every party exits non-zero."""
    assert run.server.sent(*calls) == [], run.server.sent(*calls)
    for name in run.logs:
        reasons = run.warnings(name)
        assert reasons and all(words in r for r in reasons), (name, reasons)
        assert not any(e["event"] == "final-model-written" for e in run.logs[name])
    assert run.server_status != 0
    assert set(run.site_status.values()) == {EXIT_NOT_TRAINED}, run.site_status
    assert all(not r["completed"] for r in run.records())


def test_honest_round_completes_under_every_site_policy(fed: Callable[..., Fed]) -> None:
    """The baseline for the refusals below: the same harness, an honest server, a round that
    completes, no policy warning."""
    run = fed(["a", "b", "c"]).run()
    assert run.server_status == 0 and set(run.site_status.values()) == {0}, run.site_status
    assert len(run.server.sent("SendUnmaskResponse")) == 3
    assert all(run.warnings(n) == [] for n in run.logs)
    assert run.records()[-1]["completed"]


def test_server_says_plain_site_sends_nothing(fed: Callable[..., Fed]) -> None:
    f = fed(["a", "b", "c"])
    f.patch_server(aggregation={"protocol": "plain"})  # the sites' policies say secagg only
    run = f.run()
    assert_refused(run, "'plain'", DATA_CALLS)
    for name in run.logs:
        assert not any(e["event"] == "update-computed" for e in run.logs[name])


def test_plain_is_refused_by_an_old_site_config_without_a_policy(
    fed: Callable[..., Fed],
) -> None:
    """An old site config without a policy gets the safe default (secagg / secagg+ / ckks,
    active, plain refused)."""
    f = fed(["a", "b"])
    for name in f.names:
        config = json.loads(f.site_json[name].read_text())
        del config["policy"]
        f.site_json[name].write_text(json.dumps(config))
    f.patch_server(aggregation={"protocol": "plain"})
    assert_refused(f.run(), "'plain'", DATA_CALLS)


def test_threshold_below_the_sites_minimum_is_refused(fed: Callable[..., Fed]) -> None:
    # n = 4, complete graph, active: each site requires t >= 3; the server asks for 2.
    f = fed(["a", "b", "c", "d"], aggregation={"threshold": 2})
    assert_refused(f.run(), "below this site's minimum 3")


def test_sparse_degree_below_the_sites_minimum_is_refused(fed: Callable[..., Fed]) -> None:
    # n = 5, the sites assume 10 % dropouts: they would use the complete graph (k = 4); a server
    # asking for k = 2 makes it likelier that all of a site's neighbours are gone or corrupt.
    f = fed(["a", "b", "c", "d", "e"], protocol="secagg+", aggregation={"k": 2, "threshold": 2})
    assert_refused(f.run(), "masking degree k=2 is below this site's minimum 4")


def test_semi_honest_variant_is_refused_when_the_site_requires_active(
    fed: Callable[..., Fed],
) -> None:
    f = fed(["a", "b", "c"])
    f.patch_server(aggregation={"active": False})
    assert_refused(f.run(), "semi-honest")


def test_forged_vector_length_is_refused(
    fed: Callable[..., Fed], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one wire conversion every server path uses (transport.convert delegates to it).
    real = rounds_pb.setup_to_pb

    def lying(*args: Any, **kwargs: Any) -> Any:
        setup = real(*args, **kwargs)
        setup.vector_length += 1
        return setup

    monkeypatch.setattr(rounds_pb, "setup_to_pb", lying)
    assert_refused(fed(["a", "b", "c"]).run(), "vector_length")


def test_model_of_another_size_than_pinned_is_refused(fed: Callable[..., Fed]) -> None:
    f = fed(["a", "b", "c"])  # provisioned for 6 values
    f.patch_server(model={"shapes": [[4, 2]]})  # the server serves 8
    assert_refused(f.run(), "this site expects 6")


class WeightLyingServer(SpyServer):
    """Attacker finding H1 over gRPC: rewrites each site's SecAggSetup so that the lowest site id
    (the target) encodes its update with weight ~1 and every other site with ~2**-30 (``lie``
    chooses how), to read the target's update off the unmasked sum."""

    lie = "announced"

    def _post(self, rs: Any, site: int, kind: str, message: Any) -> None:
        if kind == "secagg_setup":
            message = self._forge(site, message)
        super()._post(rs, site, kind, message)

    def _forge(self, site: int, setup: Any) -> Any:
        forged = type(setup)()
        forged.CopyFrom(setup)
        target = min(setup.site_ids)
        if self.lie == "announced":  # honest list, lying normalised weight
            forged.weight = 1.0 if site == target else 2.0**-30
        elif self.lie == "listed":  # a self-consistent lying list per site, own entry honest
            pairs = list(zip(setup.site_ids, setup.weights, strict=True))
            if site == target:  # the others look negligible to the target...
                listed = [w if s == target else w * 2.0**-30 for s, w in pairs]
            else:  # ...and the target looks dominant to the others
                listed = [w * 2.0**30 if s == target else w for s, w in pairs]
            del forged.weights[:]
            forged.weights.extend(listed)
            own = dict(zip(setup.site_ids, listed, strict=True))[site]
            forged.weight = own / sum(listed)
        elif self.lie == "frac_bits" and site != target:
            forged.frac_bits = 0
        return forged


@pytest.mark.parametrize("lie", ["listed", "frac_bits"])
def test_server_giving_sites_different_encodings_cannot_isolate_one_update(
    fed: Callable[..., Fed], lie: str
) -> None:
    """Each site is shown a self-consistent setup (its own weight as it reported it), but the
    target's weights list or the others' codec differs: the lists and codecs are bound into
    every key and signature, so the round aborts before any masked input is uploaded."""
    server_class = type("Lying", (WeightLyingServer,), {"lie": lie})
    run = fed(["a", "b", "c"]).run(server_class)
    assert run.server.sent("UploadMaskedInput") == []
    assert all(not r["completed"] for r in run.records())
    assert run.server_status != 0


def test_server_announcing_a_weight_other_than_the_listed_share_is_refused(
    fed: Callable[..., Fed],
) -> None:
    """The site computes its own normalised weight from the listed weights and refuses a setup
    whose announced weight differs (before it sends anything)."""
    run = fed(["a", "b", "c"]).run(WeightLyingServer)
    assert_refused(run, "share of the listed weights")


def test_server_listing_a_weight_other_than_the_reported_one_is_refused(
    fed: Callable[..., Fed], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = rounds_pb.setup_to_pb

    def lying(*args: Any, **kwargs: Any) -> Any:
        setup = real(*args, **kwargs)
        setup.weights[0] *= 2.0
        return setup

    monkeypatch.setattr(rounds_pb, "setup_to_pb", lying)
    run = fed(["a", "b", "c"]).run()
    assert run.server.sent(*SECAGG_CALLS) == []
    assert any("it reported" in r for r in run.warnings("a")), run.warnings("a")
    assert all(not r["completed"] for r in run.records())


class ReplayingServer(SpyServer):
    """Runs every round under round id 0."""

    def _new_round_id(self) -> int:
        return 0


def test_replayed_round_id_is_refused(fed: Callable[..., Fed]) -> None:
    run = fed(["a", "b", "c"], rounds=2).run(ReplayingServer)
    records = run.records()
    assert records[0]["completed"] and records[0]["round_id"] == 0
    # Round 1 reuses id 0: no site reports an update for it.
    assert len(run.server.sent("ReportUpdateReady")) == 3
    assert len(run.server.sent("SendUnmaskResponse")) == 3
    for name in run.logs:
        assert any("not fresh" in r for r in run.warnings(name)), run.warnings(name)
    assert not records[-1]["completed"]
    assert run.server_status != 0


class StaleModelServer(SpyServer):
    """Never moves the global model on: round 1 asks for an update of round 0's model again."""

    def _set_model(self, model: Any) -> None:
        if not self._digest:
            super()._set_model(model)


def test_second_update_for_the_same_model_is_refused(fed: Callable[..., Fed]) -> None:
    run = fed(["a", "b", "c"], rounds=2).run(StaleModelServer)
    records = run.records()
    assert records[0]["completed"]
    assert [r["round_id"] for r in records] == [0, 1]  # fresh ids: only the model repeats
    assert len(run.server.sent("ReportUpdateReady")) == 3
    assert len(run.server.sent("SendUnmaskResponse")) == 3
    for name in run.logs:
        assert any("same model" in r for r in run.warnings(name)), run.warnings(name)
    assert run.server_status != 0


def test_health_service_answers_rostered_sites_only(fed: Callable[..., Fed]) -> None:
    f = fed(["a", "b"])
    server = SpyServer(load_server_config(f.server_json))
    server.start()
    try:
        ca = (f.root / "ca" / "ca.crt").read_bytes()
        ca_cert = x509.load_pem_x509_certificate(ca)
        ca_key: Any = serialization.load_pem_private_key(
            (f.root / "ca" / "ca.key").read_bytes(), password=None
        )

        def check(cert: bytes, key: bytes) -> Any:
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            options = [("grpc.ssl_target_name_override", "secure-fl-server")]
            with grpc.secure_channel(server.address, creds, options=options) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
                )

        site = f.site_json["a"].parent
        reply = check((site / "site.crt").read_bytes(), (site / "site.key").read_bytes())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A certificate of the federation's CA, but off the roster: refused, nothing learned.
        cert, key = issue_site_certificate(ca_cert, ca_key, "mallory", f.root.name)
        with pytest.raises(grpc.RpcError) as info:
            check(cert, key)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not on the roster" in str(info.value.details())
    finally:
        server.stop()


def test_forged_reveal_set_cannot_choose_the_graph(
    fed: Callable[..., Fed], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sparse SecAgg+ (k = 2 of 5): the graph comes from the sites' committed nonces. A server
    that shows site a a different nonce for one peer (to steer a's neighbourhood) is caught by a
    before it shares any key: the nonce does not match that peer's commitment."""
    real = convert.reveal_set_to_pb
    forged: list[int] = []

    def lying(message: Any) -> Any:
        out = real(message)
        if not forged:  # the first RevealSet goes to the lowest site id: a
            out.reveals[-1].nonce = bytes(32)
            forged.append(1)
        return out

    monkeypatch.setattr(convert, "reveal_set_to_pb", lying)
    f = fed(
        ["a", "b", "c", "d", "e"],
        protocol="secagg+",
        aggregation={"k": 2, "threshold": 2, "dropout_rate": 0.0},
    )
    run = f.run()
    assert forged
    assert ("SendRevealNonce", "a") in run.server.sent("SendRevealNonce")
    assert ("SendShareKeys", "a") not in run.server.sent("SendShareKeys")
    errors = [e for e in run.logs["a"] if e["level"] == "error" and e["event"] == "protocol-error"]
    assert errors and "instruction" in errors[0] and errors[0]["instruction"] == "reveal_set"
