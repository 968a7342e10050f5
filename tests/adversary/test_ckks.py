"""CKKS against a curious or malicious server: nothing a site decrypts ever reaches the server.

The attack these tests stop (Li and Micciancio, EUROCRYPT 2021): a server that knows a ciphertext
``(c0, c1)`` and its raw CKKS decryption ``m ~ c0 + c1 * s`` can solve for the secret key ``s``
from two fully packed ciphertexts. Before this protocol version a designated site decrypted the
server's own sum and sent the values back. Now:

* no site-to-server message can carry plaintext values (the protocol has no such message);
* an honest-but-curious server that records everything it receives in real rounds gets only
  fresh site ciphertexts (never a decryption, never a re-sent ciphertext, never the model bytes);
* a site asked to decrypt for the server (an old-style request) refuses and sends nothing;
* a malicious server that serves one site's upload as the "global model" makes the victim decrypt
  it locally, but what the victim then sends is only a fresh encryption of its own new model.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tenseal")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transport"))

from transport_helpers import Federation

from secure_fl.he import SecretContext
from secure_fl.he.wire import KIND_SITE, KIND_SUM, decode_frame, encode_frame
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.chunks import iter_chunk_bytes
from secure_fl.transport.config import load_server_config, load_site_config
from secure_fl.transport.provision import provision
from secure_fl.transport.rounds import initial_model, sha256
from secure_fl.transport.tasks import SyntheticTask
from secure_fl.transport.tensors import dumps

# Payload kinds a site may send: its own protected (or, for the plain baseline, clear) update.
SITE_PAYLOADS = {"MASKED_INPUT", "PLAIN_UPDATE", "CKKS_CIPHERTEXT"}


# -- 1. the protocol has no message that carries a decryption to the server ------------------------


def test_no_site_to_server_message_can_carry_decrypted_values() -> None:
    """Fails on the protocol before this fix (CkksDecrypt, DownloadCiphertextSum,
    UploadDecryptedMean and the CKKS_MEAN payload existed)."""
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    methods = {m.name for m in service.methods}
    assert "UploadDecryptedMean" not in methods and "DownloadCiphertextSum" not in methods
    kinds = set(pb.PayloadKind.keys()) - {"PAYLOAD_KIND_UNSPECIFIED"}
    # Every payload a site can upload is its own update, protected; the rest flow to sites.
    assert kinds - SITE_PAYLOADS == {"MODEL", "CKKS_MODEL"}
    assert "CKKS_MEAN" not in kinds
    instruction = pb.DESCRIPTOR.message_types_by_name["Instruction"]
    assert "ckks_decrypt" not in instruction.fields_by_name
    assert "CkksDecrypt" not in pb.DESCRIPTOR.message_types_by_name
    # No site-to-server unary message holds a vector of floating-point values.
    for method in service.methods:
        if method.client_streaming:
            continue  # chunk streams: their kinds are checked above
        pending, seen = [method.input_type], set()
        while pending:
            message = pending.pop()
            if message.full_name in seen:
                continue
            seen.add(message.full_name)
            for f in message.fields:
                repeated_float = f.is_repeated and f.type in (f.TYPE_DOUBLE, f.TYPE_FLOAT)
                assert not repeated_float, f"{method.name}: {message.name}.{f.name}"
                if f.message_type is not None:
                    pending.append(f.message_type)


# -- 2. an honest-but-curious server records everything it receives --------------------------------


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    created = Federation(
        tmp_path / "fed",
        ["a", "b", "c"],
        protocol="ckks",
        rounds=2,
        shapes=[[100, 90], [50]],
        aggregation={"chunk_ciphertexts": 2},
        limits={"max_message_bytes": 256 * 1024, "chunk_bytes": 64 * 1024},
    )
    yield created
    created.kill_all()


def _add_keys(fed: Federation) -> SecretContext:
    import shutil

    from secure_fl.he import provision as he_provision

    made = he_provision(fed.root / "ckks-keys")
    server_ctx = fed.server_config.parent / "ckks-public.ctx"
    shutil.copyfile(made.public_path, server_ctx)
    fed.patch_server(ckks={"context": str(server_ctx), "fingerprint": made.fingerprint})
    for name in fed.names:
        target = fed.site_dir(name) / "ckks-secret.ctx"
        shutil.copyfile(made.secret_path, target)
        target.chmod(0o600)
        fed.patch_site(name, ckks={"context": str(target), "fingerprint": made.fingerprint})
    return SecretContext.load(made.secret_path)


def _windows(array: np.ndarray, width: int = 64) -> list[bytes]:
    """A few byte windows of ``array`` in float32 and float64 (what a leak would contain)."""
    flat = np.ascontiguousarray(array.reshape(-1))
    out = []
    for dtype in ("<f4", "<f8"):
        data = flat.astype(dtype).tobytes()
        for start in (0, len(data) // 2, max(0, len(data) - width)):
            out.append(data[start : start + width])
    return out


def test_curious_server_receives_only_fresh_site_ciphertexts(fed: Federation) -> None:
    """A real server (in this process, its handlers recorded) runs 2 CKKS rounds with 3 site
    processes. Everything it receives: Join, Poll, ReportUpdateReady and CKKS_CIPHERTEXT uploads
    of site frames, each ciphertext fresh (never one the server sent out) and each upload that
    site's own weight-scaled new model; none holds the bytes of any decrypted global model."""
    from secure_fl.transport import server as server_module
    from secure_fl.transport.server import FederationServer

    secret = _add_keys(fed)
    server = FederationServer(load_server_config(fed.server_config))
    unary: list[str] = []
    streams: list[tuple[pb.PayloadHeader, bytes]] = []
    sent_models: list[bytes] = []

    def record_unary(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(entry: Any, raw: bytes, context: Any) -> Any:
            unary.append(name)
            return fn(entry, raw, context)

        return wrapper

    for attr, name in [
        ("_join", "Join"),
        ("_poll", "Poll"),
        ("_report_ready", "ReportUpdateReady"),
        ("_advertise", "SendAdvertiseKeys"),
        ("_share_keys", "SendShareKeys"),
        ("_consistency", "SendConsistencySignature"),
        ("_unmask", "SendUnmaskResponse"),
    ]:
        if hasattr(server, attr):
            setattr(server, attr, record_unary(name, getattr(server, attr)))
    real_receive = server_module.receive_raw  # type: ignore[attr-defined]

    def receive(*args: Any, **kwargs: Any) -> Any:
        header, data, nbytes = real_receive(*args, **kwargs)
        streams.append((header, bytes(data)))
        return header, data, nbytes

    # CKKS uploads are fed frame by frame into the running sum (never reassembled by the
    # server): record every raw chunk of those streams and reassemble the payload here.
    real_upload = ckks_wire.receive_upload

    def receive_upload(stream: Any, *args: Any, **kwargs: Any) -> Any:
        raw: list[bytes] = []

        def tee() -> Iterator[bytes]:
            for item in stream:
                raw.append(bytes(item))
                yield item

        result = real_upload(tee(), *args, **kwargs)
        header, data, _ = real_receive(
            raw, max_chunk=1 << 30, max_total=1 << 40, check_header=lambda h: None
        )
        streams.append((header, bytes(data)))
        return result

    real_set = getattr(server, "_set_encrypted_model", None)  # absent before this fix

    def set_encrypted(blob: bytes) -> None:
        sent_models.append(blob)
        assert real_set is not None
        real_set(blob)

    if real_set is not None:
        server._set_encrypted_model = set_encrypted  # type: ignore[method-assign]
    original = server_module.receive_raw  # type: ignore[attr-defined]
    server_module.receive_raw = receive  # type: ignore[attr-defined]
    ckks_wire.receive_upload = receive_upload
    try:
        server.start()
        fed.address = server.address
        for name in fed.names:
            fed.patch_site(name, server=server.address)
            fed.start_site(name)
        for name in fed.names:
            assert fed.wait(name, 90) == 0, fed.all_logs()
        assert server.wait(30) == 0
    finally:
        server_module.receive_raw = original  # type: ignore[attr-defined]
        ckks_wire.receive_upload = real_upload
        server.stop()

    assert set(unary) <= {"Join", "Poll", "ReportUpdateReady"}, set(unary)
    kinds = {pb.PayloadKind.Name(h.kind) for h, _ in streams}
    assert kinds == {"CKKS_CIPHERTEXT"}, kinds
    assert len(streams) == 6 and len(sent_models) == 2  # 3 sites x 2 rounds; 2 global models

    sent_cts: set[bytes] = set()
    for blob in sent_models:
        for frame in ckks_wire.decode_model(blob).frames:
            sent_cts.update(decode_frame(frame).blobs)
    received_cts: list[bytes] = []
    model0 = initial_model(load_server_config(fed.server_config).model)
    globals_ = [model0] + [ckks_wire.decrypt_model(secret, b) for b in sent_models]
    tasks = fed.tasks()
    weights = {s: t.weight for s, t in tasks.items()}
    total = sum(weights.values())
    by_round: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for header, data in streams:
        frames = ckks_wire.unpack_frames(data, header.length)
        values = []
        for frame in frames:
            parsed = decode_frame(frame)
            assert parsed.kind == KIND_SITE and parsed.contributors == 1
            received_cts.extend(parsed.blobs)
            values.append(_decrypt_frame(secret, frame))
        by_round[header.round_id].append(np.concatenate(values))
    # Fresh: no ciphertext repeats, and none is one the server sent out.
    assert len(set(received_cts)) == len(received_cts)
    assert not set(received_cts) & sent_cts
    # Each upload is a site's own weight-scaled new model (global + its update), nothing else.
    for r in (0, 1):
        expected = []
        for sid, task in tasks.items():
            update = task.compute_update(globals_[r], r).update
            local = ckks_wire.local_model_vector(globals_[r], update)
            expected.append(weights[sid] / total * local)
        for got in by_round[r]:
            assert min(np.max(np.abs(got - e)) for e in expected) < 1e-6
    # No decrypted global model, in float32 or float64, inside anything the server received.
    everything = b"".join(data for _, data in streams)
    for model in globals_[1:]:
        for tensor in model.values():
            for window in _windows(tensor):
                assert window not in everything
    final = json.loads(json.dumps(fed.checkpoint()))
    assert final["model_format"] == "ckks-encrypted"


def _decrypt_frame(secret: SecretContext, frame: bytes) -> np.ndarray:
    import tenseal as ts

    parts = [
        np.asarray(ts.ckks_vector_from(secret.tenseal_context, blob).decrypt())
        for blob in decode_frame(frame).blobs
    ]
    return np.concatenate(parts)


# -- 3 and 4: a site driven by a scripted (malicious) server ---------------------------------------


class _StopError(Exception):
    pass


class _ScriptedServer:
    """Plays the server for one SiteRunner: answers Poll from a script, serves one model, and
    records every call the site makes (name and payload)."""

    def __init__(self, site_id: int, name: str, instructions: list[pb.Instruction]) -> None:
        self.site_id, self.name = site_id, name
        self.script = list(instructions)
        self.calls: list[tuple[str, Any]] = []
        self.model = b""
        self.model_kind = pb.MODEL
        self.uploads: list[tuple[pb.PayloadHeader, bytes]] = []

    # FederationStub
    def Join(self, request: pb.JoinRequest, timeout: float = 0) -> pb.JoinReply:
        self.calls.append(("Join", request))
        return pb.JoinReply(
            federation="fed",
            session=b"s" * 16,
            site_id=self.site_id,
            site_name=self.name,
            rounds=3,
            max_chunk_bytes=1 << 16,
            poll_wait_ms=100,
        )

    def Poll(self, request: pb.PollRequest, timeout: float = 0) -> pb.Instruction:
        self.calls.append(("Poll", (request.attempt, request.next_index)))
        if not self.script:
            raise _StopError
        return self.script.pop(0)

    def ReportUpdateReady(self, request: pb.UpdateReady, timeout: float = 0) -> pb.Ack:
        self.calls.append(("ReportUpdateReady", request.weight))
        return pb.Ack(round_id=request.round_id)

    def __getattr__(self, name: str) -> Any:  # any other RPC: recorded, then refused
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args))
            raise AssertionError(f"the site called {name}")

        return call

    # _RawCalls
    def download(self, request: pb.ModelRequest, timeout: float = 0) -> Iterator[bytes]:
        self.calls.append(("DownloadModel", request.model_sha256))
        header = pb.PayloadHeader(kind=self.model_kind, length=1)
        yield from iter_chunk_bytes(header, self.model, 1 << 16)

    def upload_ciphertext(self, chunks: Iterator[bytes], timeout: float = 0) -> pb.Ack:
        data = list(chunks)
        first = pb.Chunk.FromString(data[0]).header
        body = b"".join(pb.Chunk.FromString(c).data for c in data[1:-1])
        self.calls.append(("UploadCiphertext", first.kind))
        self.uploads.append((first, body))
        return pb.Ack()


def _site(tmp_path: Path, name: str = "b") -> tuple[Any, SecretContext]:
    from secure_fl.transport.site import SiteRunner

    done = provision(tmp_path / "fed", ["a", "b", "c"], protocol="ckks", ckks=True)
    config = load_site_config(done.site_configs[name])
    assert config.ckks is not None
    return SiteRunner(config), SecretContext.load(config.ckks.context)


def _run(runner: Any, server: _ScriptedServer) -> None:
    runner._connect = lambda: server
    runner._raw = server
    with pytest.raises(_StopError):
        runner._session_loop()


def _round_start(attempt: int, round_id: int, digest: bytes) -> pb.Instruction:
    return pb.Instruction(
        attempt=attempt,
        index=0,
        round_id=round_id,
        round_start=pb.RoundStart(
            aggregation="ckks", model_sha256=digest, deadline_s=60, round_index=round_id
        ),
    )


def _ckks_setup(secret: SecretContext, size: int, *, round_id: int) -> pb.Instruction:
    """A CKKS setup instruction (attempt 1, weight 1/2) for this federation's keys."""
    return pb.Instruction(
        attempt=1,
        index=1,
        round_id=round_id,
        ckks_setup=pb.CkksSetup(
            context_sha256=bytes.fromhex(secret.fingerprint),
            poly_modulus_degree=secret.preset.poly_modulus_degree,
            scale=secret.preset.scale,
            weight=0.5,
            vector_length=size,
            chunk_ciphertexts=64,
            phase_deadline_s=60,
        ),
    )


def _old_style_decrypt(attempt: int, index: int, round_id: int, fp: bytes) -> pb.Instruction:
    """Instruction field 20 as protocol versions before this one sent it: CkksDecrypt(context,
    contributors=[1, 2], share=1.0, ...) asking the site to decrypt the server's sum."""
    body = (
        b"\x0a"
        + bytes([len(fp)])
        + fp  # context_sha256 = 1
        + b"\x12\x02\x01\x02"  # contributors = 2 (packed [1, 2])
        + b"\x19"
        + struct.pack("<d", 1.0)  # share = 3
        + b"\x22\x20"
        + b"\x00" * 32  # sum_sha256 = 4
        + b"\x30\x01"  # chunks = 6
        + b"\x38\x90\x02"  # vector_length = 7 (272)
        + b"\x40\x40"  # chunk_ciphertexts = 8 (64)
    )
    head = pb.Instruction(attempt=attempt, index=index, round_id=round_id).SerializeToString()
    raw = head + b"\xa2\x01" + bytes([len(body)]) + body
    return pb.Instruction.FromString(raw)


def test_site_refuses_an_old_style_request_to_decrypt_for_the_server(tmp_path: Path) -> None:
    """The server starts a CKKS round, the site reports its weight, then the server sends the old
    CkksDecrypt instruction. The site refuses it: it downloads no sum, decrypts nothing, uploads
    nothing, and logs the refusal. (Before this fix the site downloaded the sum, decrypted it and
    uploaded the mean: the Li-Micciancio key-recovery oracle.)"""
    runner, secret = _site(tmp_path)
    model = initial_model(load_server_config(tmp_path / "fed" / "server" / "server.json").model)
    blob = dumps(model)
    fp = bytes.fromhex(secret.fingerprint)
    server = _ScriptedServer(
        2, "b", [_round_start(1, 0, sha256(blob)), _old_style_decrypt(1, 1, 0, fp)]
    )
    server.model = blob
    events: list[tuple[str, dict[str, Any]]] = []
    real_warning = runner.log.warning

    def warning(event: str, **fields: Any) -> None:
        events.append((event, fields))
        real_warning(event, **fields)

    runner.log.warning = warning
    _run(runner, server)
    names = [c[0] for c in server.calls]
    assert set(names) <= {"Join", "Poll", "DownloadModel", "ReportUpdateReady"}, names
    assert ("refused-unknown-instruction", {"round_id": 0, "fields": [20]}) in [
        (e, {k: v for k, v in f.items() if k in ("round_id", "fields")}) for e, f in events
    ]
    # The refusal was acknowledged by asking for the next instruction, not by looping on it.
    polls = [c[1] for c in server.calls if c[0] == "Poll"]
    assert polls[-1] == (1, 2)
    assert runner._round is not None and runner._round.failed


def test_malicious_server_serving_one_sites_upload_as_the_global_model(tmp_path: Path) -> None:
    """The server takes site a's round-0 upload (one site's weight-scaled model), relabels its
    frames as a 'sum of 2 sites' and serves it to site b as the round-0 global model. Site b
    cannot tell and decrypts it locally; but nothing decrypted leaves b: its only upload is a
    fresh encryption (no ciphertext in common with what it received) of its own new local model
    scaled by its own weight."""
    from secure_fl.he import Layout, SiteEncryptor

    runner, secret = _site(tmp_path)
    shapes = load_server_config(tmp_path / "fed" / "server" / "server.json").model
    model0 = initial_model(shapes)
    structure = ckks_wire.structure_of(model0)
    size = ckks_wire.structure_size(structure)
    layout = Layout(size, secret.preset.slots, 64)
    a_model = 0.3 * np.random.default_rng(1).standard_normal(size)
    a_frames = list(SiteEncryptor(secret, layout).stream(a_model, factor=0.4, round_id=0))
    forged = []
    for frame in a_frames:  # the frame digest is not keyed: the server can rewrite any header
        f = decode_frame(frame)
        forged.append(
            encode_frame(
                kind=KIND_SUM,
                fingerprint=f.fingerprint,
                round_id=f.round_id,
                chunk=f.chunk,
                values=f.values,
                contributors=2,
                blobs=list(f.blobs),
            )
        )
    served = ckks_wire.encode_model(
        ckks_wire.EncryptedModel(
            fingerprint=secret.fingerprint,
            round_id=0,
            share=0.4,
            contributors=2,
            chunk_ciphertexts=64,
            structure=structure,
            frames=tuple(forged),
        )
    )
    setup = _ckks_setup(secret, size, round_id=1)
    server = _ScriptedServer(2, "b", [_round_start(1, 1, sha256(served)), setup])
    server.model, server.model_kind = served, pb.CKKS_MODEL
    _run(runner, server)

    names = [c[0] for c in server.calls]
    assert set(names) <= {"Join", "Poll", "DownloadModel", "ReportUpdateReady", "UploadCiphertext"}
    assert names.count("UploadCiphertext") == 1, names
    # b decrypted a's model locally (the forged "global model")...
    np.testing.assert_allclose(
        np.concatenate([v.ravel() for v in runner._model.values()]),
        a_model.astype(np.float32),
        atol=1e-6,
    )
    # ...but its upload shares no ciphertext with what it received, and decrypts to b's own
    # new local model (the model it holds + its update) scaled by its own weight 0.5.
    header, body = server.uploads[0]
    frames = ckks_wire.unpack_frames(body, header.length)
    received = {blob for f in forged for blob in decode_frame(f).blobs}
    got = []
    for frame in frames:
        parsed = decode_frame(frame)
        assert parsed.kind == KIND_SITE and parsed.round_id == 1
        assert not set(parsed.blobs) & received
        got.append(_decrypt_frame(secret, frame))
    task = SyntheticTask("b", **dict(runner.config.task.options))
    update = task.compute_update(runner._model, 1).update
    want = 0.5 * ckks_wire.local_model_vector(runner._model, update)
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-6)


# -- 5. fail closed: a check after decryption stops the site for good ------------------------------


def _out_of_range_model(secret: SecretContext, structure: Any, how: str) -> bytes:
    """An encrypted "global model" of round 0 that decrypts beyond ``max_abs``: a lying share
    (the values are fine, Dec / share is not), or (as the attacker review's oracle script did, with
    the public context only) a plaintext offset added to one slot of a site's upload."""
    import tenseal as ts

    from secure_fl.he import Layout, SiteEncryptor

    size = ckks_wire.structure_size(structure)
    layout = Layout(size, secret.preset.slots, 64)
    values = 0.3 * np.random.default_rng(2).standard_normal(size)
    frames = []
    for frame in SiteEncryptor(secret, layout).stream(values, factor=0.5, round_id=0):
        f = decode_frame(frame)
        blobs = list(f.blobs)
        if how == "offset":
            public = secret.public().tenseal_context
            vec = ts.ckks_vector_from(public, blobs[0])
            shift = np.zeros(vec.size())
            shift[1] = 4 * secret.preset.max_abs
            blobs[0] = (vec + shift.tolist()).serialize()
        frames.append(
            encode_frame(
                kind=KIND_SUM,
                fingerprint=f.fingerprint,
                round_id=f.round_id,
                chunk=f.chunk,
                values=f.values,
                contributors=2,
                blobs=blobs,
            )
        )
    return ckks_wire.encode_model(
        ckks_wire.EncryptedModel(
            fingerprint=secret.fingerprint,
            round_id=0,
            share=1e-4 if how == "share" else 0.5,
            contributors=2,
            chunk_ciphertexts=64,
            structure=structure,
            frames=tuple(frames),
        )
    )


def _ckks_round_start(attempt: int, round_id: int, digest: bytes, model_round: int) -> Any:
    inst = _round_start(attempt, round_id, digest)
    inst.round_start.model_round_id = model_round
    return inst


def _attach(runner: Any, server: _ScriptedServer) -> None:
    runner._connect = lambda: server
    runner._raw = server


@pytest.mark.parametrize("how", ["share", "offset"])
def test_site_fails_closed_when_the_decrypted_model_is_out_of_range(
    tmp_path: Path, how: str
) -> None:
    """The server serves an encrypted model that decrypts beyond ``max_abs`` (the probe of the
    decryption-validity oracle). The site stops for good: it sends nothing after the download
    (no ReportUpdateReady, not even another Poll), writes ``FAIL-CLOSED.json`` in its state_dir,
    logs an ERROR that says why without any decrypted value, and exits with EXIT_FAIL_CLOSED. A
    restarted site refuses to start (it does not even Join) until the marker is removed. Fails
    before this fix: the site skipped only that round and kept polling, so the server could ask
    again with another offset, one bit per round (binary search of another site's model)."""
    from secure_fl.transport.site import EXIT_FAIL_CLOSED, FAIL_CLOSED_MARKER, SiteRunner

    runner, secret = _site(tmp_path)
    model0 = initial_model(load_server_config(tmp_path / "fed" / "server" / "server.json").model)
    served = _out_of_range_model(secret, ckks_wire.structure_of(model0), how)
    # Two rounds are scripted: a site that only skips the round would go on to the second.
    server = _ScriptedServer(
        2,
        "b",
        [
            _ckks_round_start(1, 1, sha256(served), 0),
            _ckks_round_start(2, 2, sha256(served), 0),
        ],
    )
    server.model, server.model_kind = served, pb.CKKS_MODEL
    events: list[tuple[str, dict[str, Any]]] = []
    real_error = runner.log.error

    def error(event: str, exc: bool = False, **fields: Any) -> None:
        events.append((event, fields))
        real_error(event, exc, **fields)

    runner.log.error = error
    _attach(runner, server)
    status = runner.run()

    assert status == EXIT_FAIL_CLOSED == 6
    names = [c[0] for c in server.calls]
    assert names == ["Join", "Poll", "DownloadModel"], names  # nothing after the download
    marker = runner.config.state_dir / FAIL_CLOSED_MARKER
    record = json.loads(marker.read_text())
    assert record["round_id"] == 1 and record["federation"] == runner.config.federation
    assert "beyond the bound" in record["reason"]
    closed = [f for e, f in events if e == "fail-closed"]
    assert len(closed) == 1 and "beyond the bound" in closed[0]["reason"]
    # No decrypted value in what the site wrote: only the bound itself is a number there.
    log_text = runner.config.log_file.read_text() if runner.config.log_file else ""
    for text in (json.dumps(closed[0]), marker.read_text(), log_text):
        assert "reaches" not in text and "magnitudes up to" not in text

    # Restarted while the marker exists: refuses before contacting the server.
    restarted = SiteRunner(runner.config)
    again = _ScriptedServer(2, "b", [])
    _attach(restarted, again)
    assert restarted.run() == EXIT_FAIL_CLOSED
    assert again.calls == []
    # An operator removes the marker: the site joins again.
    marker.unlink()
    resumed = SiteRunner(runner.config)
    third = _ScriptedServer(2, "b", [])
    _attach(resumed, third)
    with pytest.raises(_StopError):
        resumed.run()
    assert [c[0] for c in third.calls][:1] == ["Join"]


def test_a_check_before_decryption_refuses_only_the_round(tmp_path: Path) -> None:
    """A model whose header is wrong (here: the result of another round than announced) depends
    only on what the server sent: the site refuses that round, writes no marker and goes on to
    the next instruction."""
    from secure_fl.transport.site import FAIL_CLOSED_MARKER

    runner, secret = _site(tmp_path)
    model0 = initial_model(load_server_config(tmp_path / "fed" / "server" / "server.json").model)
    served = _out_of_range_model(secret, ckks_wire.structure_of(model0), "share")
    server = _ScriptedServer(
        2,
        "b",
        [
            _ckks_round_start(1, 5, sha256(served), 3),  # announced: result of round 3, not 0
            _ckks_round_start(2, 6, sha256(served), 4),
        ],
    )
    server.model, server.model_kind = served, pb.CKKS_MODEL
    _run(runner, server)
    names = [c[0] for c in server.calls]
    assert names.count("DownloadModel") == 2 and "ReportUpdateReady" not in names, names
    assert not (runner.config.state_dir / FAIL_CLOSED_MARKER).exists()


def test_site_clips_an_update_that_leaves_the_range_and_uploads(tmp_path: Path) -> None:
    """The server serves a (public, plaintext) model sitting at ``max_abs`` and the site's local
    training overshoots: its new local model (model + update) goes beyond the bound. Whether it
    does depends on the site's secret update and on a model the server chose, so any reaction
    the server can see would be a one-bit oracle on the update (model at ``max_abs - theta``:
    "refused" iff the update exceeds ``theta``; a fail-closed stop is the same bit, once per
    site, and lets the server knock a site out at will). The site reports its weight, clips the
    new local model into range and uploads it like any other round: no marker, and the upload
    decrypts to ``weight * clip(model + update)``. Fails before this fix: the site wrote
    FAIL-CLOSED.json and exited 6 right after the download."""
    from secure_fl.transport.site import FAIL_CLOSED_MARKER

    runner, secret = _site(tmp_path)
    runner.task = SyntheticTask("b", rate=3.0)  # local training that overshoots
    model0 = initial_model(load_server_config(tmp_path / "fed" / "server" / "server.json").model)
    bound = secret.preset.max_abs
    at_bound = {k: np.full_like(v, bound) for k, v in model0.items()}
    blob = dumps(at_bound)
    size = ckks_wire.structure_size(ckks_wire.structure_of(model0))
    update = runner.task.compute_update(at_bound, 0).update
    raw = ckks_wire.local_model_vector(at_bound, update)
    assert np.max(np.abs(raw)) > bound  # the new local model does leave the range
    server = _ScriptedServer(
        2, "b", [_round_start(1, 0, sha256(blob)), _ckks_setup(secret, size, round_id=0)]
    )
    server.model = blob
    _run(runner, server)
    names = [c[0] for c in server.calls]
    assert names.count("ReportUpdateReady") == 1 and names.count("UploadCiphertext") == 1, names
    assert not (runner.config.state_dir / FAIL_CLOSED_MARKER).exists()
    header, body = server.uploads[0]
    frames = ckks_wire.unpack_frames(body, header.length)
    got = np.concatenate([_decrypt_frame(secret, f) for f in frames])[:size]
    np.testing.assert_allclose(got, 0.5 * np.clip(raw, -bound, bound), atol=1e-3)


def test_the_served_model_check_refuses_the_round_and_fails_closed_only_if_decrypted(
    tmp_path: Path,
) -> None:
    """``check_served_model``: a model sent in the clear beyond ``max_abs`` (or non-finite) is a
    PolicyError (the server's values alone); the same values in a model decrypted on the site
    are a PostDecryptionError (fail closed); no message quotes a value."""
    from secure_fl.errors import PolicyError, PostDecryptionError
    from secure_fl.transport.site_round import check_served_model

    _, secret = _site(tmp_path)
    bound = secret.preset.max_abs
    check_served_model(secret, {"w": np.full(3, -bound, dtype=np.float32)}, decrypted=True)
    for bad in (np.array([0.0, bound * 1.5]), np.array([np.nan, 0.0])):
        with pytest.raises(PolicyError) as refused:
            check_served_model(secret, {"w": bad})
        assert not isinstance(refused.value, PostDecryptionError)
        with pytest.raises(PostDecryptionError) as closed:
            check_served_model(secret, {"w": bad}, decrypted=True)
        for text in (str(refused.value), str(closed.value)):
            assert f"{bound * 1.5:g}" not in text and "nan" not in text.lower()


def test_site_refuses_only_the_round_when_the_served_model_is_out_of_range(
    tmp_path: Path,
) -> None:
    """A plaintext model served beyond ``max_abs`` cannot be the base of an encodable upload.
    That outcome depends only on what the server sent: the site refuses that round before its
    task runs (no weight reported, no marker) and takes the next instruction."""
    from secure_fl.transport.site import FAIL_CLOSED_MARKER

    runner, secret = _site(tmp_path)
    model0 = initial_model(load_server_config(tmp_path / "fed" / "server" / "server.json").model)
    beyond = {k: np.full_like(v, 2 * secret.preset.max_abs) for k, v in model0.items()}
    blob = dumps(beyond)
    server = _ScriptedServer(
        2, "b", [_round_start(1, 0, sha256(blob)), _round_start(2, 1, sha256(blob))]
    )
    server.model = blob
    _run(runner, server)
    names = [c[0] for c in server.calls]
    assert "ReportUpdateReady" not in names and names.count("Poll") == 3, names
    assert not (runner.config.state_dir / FAIL_CLOSED_MARKER).exists()
