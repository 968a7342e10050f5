"""A TLS verification failure is fatal for a site, with one line naming the CA mismatch.

Two federations provisioned separately (each with its own CA) over loopback: a site of one
talking to the server of the other fails the handshake. The site must stop at once with
``EXIT_TLS`` and a reason that names the CA file (or its certificate) and the peer, instead of
reconnecting until ``reconnect_timeout_s`` (300 s here) runs out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from secure_fl.transport import tls
from secure_fl.transport.config import SiteConfig, load_server_config, load_site_config
from secure_fl.transport.provision import provision
from secure_fl.transport.site import EXIT_TLS, SiteRunner


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def debug(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = debug

    def error(self, event: str, exc: bool = False, **fields: Any) -> None:
        self.events.append((event, fields))


@dataclasses.dataclass
class _Two:
    port: int
    own: SiteConfig  # a site of the server's federation
    other: SiteConfig  # the same site name in another federation


@pytest.fixture
def two(tmp_path: Path) -> Iterator[_Two]:
    a = provision(tmp_path / "A", ["a", "b"], ckks=False)
    b = provision(tmp_path / "B", ["a", "b"], ckks=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    creds = tls.server_credentials(load_server_config(a.server_config).tls)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        yield _Two(
            port,
            dataclasses.replace(load_site_config(a.site_configs["a"]), server=address),
            dataclasses.replace(load_site_config(b.site_configs["a"]), server=address),
        )
    finally:
        server.stop(None)


def _run(config: SiteConfig) -> tuple[int, list[tuple[str, dict[str, Any]]], float]:
    log = _Log()
    runner = SiteRunner(config, log=log)  # type: ignore[arg-type]
    t0 = time.monotonic()
    status = runner.run()
    return status, log.events, time.monotonic() - t0


def test_server_certificate_of_another_ca_is_fatal_and_named(two: _Two) -> None:
    status, events, seconds = _run(two.other)
    assert status == EXIT_TLS == 7
    failed = [f for e, f in events if e == "tls-verification-failed"]
    assert len(failed) == 1, events
    reason = failed[0]["reason"]
    assert "CA mismatch" in reason and str(two.other.tls.ca) in reason
    assert two.other.server in reason and "server" in reason
    assert not [e for e, _ in events if e == "reconnecting"]  # not retried
    assert seconds < 10


def test_site_certificate_of_another_ca_is_fatal_and_named(two: _Two) -> None:
    """The site trusts the server (its own federation's CA) but presents a certificate of the
    other federation: the server refuses it after the handshake (TLS 1.3), which gRPC reports
    only as a closed socket; the site's probe tells it apart from a server that is down."""
    mixed = dataclasses.replace(
        two.own,
        tls=dataclasses.replace(two.own.tls, cert=two.other.tls.cert, key=two.other.tls.key),
    )
    status, events, seconds = _run(mixed)
    assert status == EXIT_TLS
    reason = next(f["reason"] for e, f in events if e == "tls-verification-failed")
    assert "refuses this site's certificate" in reason and str(mixed.tls.cert) in reason
    assert "CA mismatch" in reason and mixed.server in reason
    assert seconds < 10


def test_a_matching_federation_passes_the_probe_and_other_failures_are_not_tls(
    two: _Two,
) -> None:
    address = two.own.server
    assert tls.probe_server(two.own.tls, address, two.own.server_name) == "ok"
    assert tls.probe_server(two.other.tls, address, two.other.server_name).startswith("verify: ")
    down = "failed to connect to all addresses; last error: UNKNOWN: Connection refused"
    assert tls.diagnose_handshake(down, two.own.tls, address, two.own.server_name) is None
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: Socket closed"
    assert tls.diagnose_handshake(closed, two.own.tls, address, two.own.server_name) is None
    assert tls.split_address("dns:///[::1]:50051") == ("::1", 50051)
    assert tls.split_address("no-port") is None
