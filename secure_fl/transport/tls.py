"""Mutual TLS: credentials for both ends, and the identity of the calling site.

The server requires a client certificate signed by the federation's CA (gRPC refuses the TLS
handshake otherwise). On every call :class:`Authenticator` then reads the peer's certificate from
the TLS session and accepts it only if its common name is on the roster, it is valid for client
authentication (extended key usage ``clientAuth``), and its SHA-256 fingerprint matches the
roster entry when one is pinned. The site's identity is never taken from a message field.

A TLS verification failure is fatal for a site, with one line naming the CA mismatch
(:func:`diagnose_handshake`): the server's certificate not signed by the site's CA file, or the
site's certificate refused by the server (not signed by the CA the server trusts). Retrying
cannot fix either, so a site does not retry forever.

The standard gRPC health service (:class:`RosterHealthServicer`) goes through the same check: an
identity off the roster (even with a certificate of the federation's CA) is refused with
PERMISSION_DENIED and learns nothing, not even whether the server is serving.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2

from secure_fl.errors import ConfigError
from secure_fl.transport.config import RosterEntry, TlsFiles
from secure_fl.transport.errors import RejectedError


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS credentials for the server: its certificate and key, and the CA that client
    certificates must chain to (client authentication required). Errors: ConfigError."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key, "server key"), _read(tls.cert, "server certificate"))],
        root_certificates=_read(tls.ca, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """TLS credentials for a site: the CA the server's certificate must chain to, and the site's
    own certificate and key. Errors: ConfigError."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "CA certificate"),
        private_key=_read(tls.key, "site key"),
        certificate_chain=_read(tls.cert, "site certificate"),
    )


def fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 fingerprint (hex) of a PEM certificate's DER encoding."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert_fingerprint(cert)


def cert_fingerprint(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


class Authenticator:
    """Maps the TLS peer of a call to its roster entry (see the module docstring).

    Errors (:class:`RejectedError`): UNAUTHENTICATED when the call carries no client certificate,
    PERMISSION_DENIED when the certificate is not on the roster, not for client authentication,
    expired, or not the pinned one.
    """

    def __init__(self, roster: tuple[RosterEntry, ...]) -> None:
        self._by_name = {e.name: e for e in roster}
        # PEM -> (entry or refusal, end of validity); the time is checked on every call.
        self._cache: dict[bytes, tuple[RosterEntry | RejectedError, datetime.datetime]] = {}
        self._lock = threading.Lock()

    def identify(self, context: grpc.ServicerContext) -> RosterEntry:
        auth = context.auth_context()
        # gRPC returns a list of values per key (the type stubs say bytes): accept both.
        found: object = auth.get("x509_pem_cert")
        if isinstance(found, bytes):
            pems = [found]
        elif isinstance(found, list | tuple):
            pems = [p for p in found if isinstance(p, bytes)]
        else:
            pems = []
        if len(pems) != 1:
            raise RejectedError("UNAUTHENTICATED", "a client certificate is required")
        pem = pems[0]
        with self._lock:
            cached = self._cache.get(pem)
        if cached is None:
            cached = self._check(pem)
            with self._lock:
                if len(self._cache) > 1024:
                    self._cache.clear()
                self._cache[pem] = cached
        known, not_after = cached
        if isinstance(known, RejectedError):
            raise known
        if datetime.datetime.now(datetime.UTC) > not_after:
            raise RejectedError("PERMISSION_DENIED", f"certificate {known.name!r} has expired")
        return known

    def _check(self, pem: bytes) -> tuple[RosterEntry | RejectedError, datetime.datetime]:
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            never = datetime.datetime.max.replace(tzinfo=datetime.UTC)
            return RejectedError(
                "UNAUTHENTICATED", "the client certificate cannot be parsed"
            ), never
        return self._judge(cert), cert.not_valid_after_utc

    def _judge(self, cert: x509.Certificate) -> RosterEntry | RejectedError:
        name = common_name(cert)
        entry = self._by_name.get(name) if name is not None else None
        if entry is None:
            return RejectedError("PERMISSION_DENIED", f"certificate {name!r} is not on the roster")
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            return RejectedError(
                "PERMISSION_DENIED", f"certificate {name!r} is not valid for client authentication"
            )
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return RejectedError("PERMISSION_DENIED", f"certificate {name!r} is not valid now")
        if entry.cert_sha256 is not None and cert_fingerprint(cert) != entry.cert_sha256.lower():
            return RejectedError(
                "PERMISSION_DENIED",
                f"certificate {name!r} is not the one pinned on the roster",
            )
        return entry


class RosterHealthServicer(health.HealthServicer):
    """``grpc.health.v1.Health`` for rostered, authenticated sites only (module docstring).

    Errors: the call is aborted with the :class:`Authenticator`'s status (UNAUTHENTICATED or
    PERMISSION_DENIED) for any other peer.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__(experimental_non_blocking=True)
        self._authenticator = authenticator

    def _admit(self, context: grpc.ServicerContext) -> None:
        try:
            self._authenticator.identify(context)
        except RejectedError as r:
            context.abort(getattr(grpc.StatusCode, r.code), r.message)

    def Check(  # noqa: N802 - the gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._admit(context)
        return super().Check(request, context)

    def Watch(  # noqa: N802 - the gRPC method name
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[..., Any] | None = None,
    ) -> Any:
        self._admit(context)
        if send_response_callback is None:
            return super().Watch(request, context)
        return super().Watch(request, context, send_response_callback)


#: What gRPC says when this end refused the peer's certificate (BoringSSL / OpenSSL wording).
_VERIFY_FAILED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
#: What gRPC says when the connection broke during or right after the handshake: the server may
#: have refused this site's certificate (TLS 1.3 sends that verdict after the handshake).
_MAYBE_REFUSED = ("Socket closed", "handshake", "TSI_", "ALERT", "alert", "Connection reset")


def _cert_summary(path: Path) -> str:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return "unreadable"
    return f"issued by {cert.issuer.rfc4514_string()!r}"


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``, an optional ``dns:`` / ``ipv4:`` / ``ipv6:`` scheme) as a
    (host, port) pair, or None when ``address`` is not of that form."""
    text = address
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def probe_server(tls: TlsFiles, address: str, server_name: str, timeout_s: float = 5.0) -> str:
    """Open one TLS connection to ``address`` as a site would (``tls.ca`` as the only trust
    anchor, the site's certificate, ALPN h2) and report what happened: ``"ok"`` (the server
    spoke after the handshake), ``"closed"`` (it closed the connection right after the
    handshake: it refused this site's certificate), ``"verify: <reason>"`` (the server's
    certificate failed this site's check) or ``"unreachable"``. Sends no application data."""
    where = split_address(address)
    if where is None:
        return "unreachable"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        return f"verify: this site's TLS files cannot be loaded ({exc})"
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(where, timeout=timeout_s) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as conn,
        ):
            conn.settimeout(timeout_s)
            try:
                data = conn.recv(1)
            except TimeoutError:
                return "ok"  # the connection stayed open: the server accepted us
            except (ssl.SSLError, ConnectionError):
                return "closed"
            return "ok" if data else "closed"
    except ssl.SSLCertVerificationError as exc:
        return f"verify: {exc.verify_message}"
    except ssl.SSLError as exc:
        return "closed" if "ALERT" in str(exc).upper() else "unreachable"
    except OSError:
        return "unreachable"


def diagnose_handshake(
    detail: str, tls: TlsFiles, address: str, server_name: str, *, probe: bool = True
) -> str | None:
    """The one-line reason of a TLS verification failure, from a failed call's gRPC ``detail``
    (and, when the detail is ambiguous and ``probe`` is true, two :func:`probe_server`
    connections half a second apart): the server's certificate not signed by this site's CA
    (``tls.ca``), or this site's certificate (``tls.cert``) refused by the server. None when the
    failure is not a TLS verification failure (the server is down, restarting, ...): the caller
    retries as usual."""
    if any(word in detail for word in _VERIFY_FAILED):
        reason = detail.rsplit("CERTIFICATE_VERIFY_FAILED:", 1)[-1].strip(" :OK") or "refused"
        return (
            f"TLS verification failed (CA mismatch): the certificate of the server {address} "
            f"({server_name!r}) is not signed by this site's CA {tls.ca} ({reason}); the server "
            "and this site were provisioned by different federations (or the CA file is wrong)"
        )
    if not probe or not any(word in detail for word in _MAYBE_REFUSED):
        return None
    outcome = probe_server(tls, address, server_name)
    if outcome.startswith("verify: "):
        return (
            f"TLS verification failed (CA mismatch): the certificate of the server {address} "
            f"({server_name!r}) does not pass this site's check against its CA {tls.ca} "
            f"({outcome[len('verify: ') :]})"
        )
    if outcome != "closed":
        return None
    time.sleep(0.5)
    if probe_server(tls, address, server_name) != "closed":
        return None
    return (
        f"TLS verification failed (CA mismatch): the server {address} refuses this site's "
        f"certificate {tls.cert} ({_cert_summary(tls.cert)}): it is not signed by the CA the "
        "server trusts (or it expired); the server and this site were provisioned by different "
        "federations"
    )
