"""CKKS rounds over gRPC, as real processes on loopback: the sites encrypt their weight-scaled new
local models, the server (public context only) adds them into the encrypted global model and
never receives anything decrypted; every site decrypts the global model itself. The sites' final
models equal the in-process reference within the CKKS tolerance of ``protocols/ckks.md``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from transport_helpers import REPO, Federation, wait_until

from secure_fl.encoding import flatten
from secure_fl.errors import ConfigError
from secure_fl.transport import ckks as ckks_wire
from secure_fl.transport import tensors
from secure_fl.transport.config import load_server_config
from secure_fl.transport.rounds import apply_mean, initial_model

pytest.importorskip("tenseal")

from secure_fl.he import PublicContext, SecretContext, encrypted_mean
from secure_fl.he import provision as he_provision

# protocols/ckks.md: the relative error (max abs error / largest magnitude of the mean) stays
# below 1e-6 for updates whose mean exceeds about 1e-4.
REL_TOL = 1e-6


def add_ckks(fed: Federation, *, foreign: Sequence[str] = ()) -> Path:
    """Provision CKKS keys for ``fed``: the public context for the server, the secret one for each
    site (sites in ``foreign`` get a secret context of another provisioning, with its own
    fingerprint). Returns the directory of the federation's artefacts."""
    made = he_provision(fed.root / "ckks-keys")
    server_ctx = fed.server_config.parent / "ckks-public.ctx"
    shutil.copyfile(made.public_path, server_ctx)
    fed.patch_server(ckks={"context": str(server_ctx), "fingerprint": made.fingerprint})
    other = he_provision(fed.root / "ckks-other") if foreign else None
    for name in fed.names:
        src, fp = made.secret_path, made.fingerprint
        if name in foreign:
            assert other is not None
            src, fp = other.secret_path, other.fingerprint
        target = fed.site_dir(name) / "ckks-secret.ctx"
        shutil.copyfile(src, target)
        target.chmod(0o600)
        fed.patch_site(name, ckks={"context": str(target), "fingerprint": fp})
    return fed.root / "ckks-keys"


def ckks_federation(
    make: Callable[..., Federation], names: list[str], **kwargs: object
) -> Federation:
    options: dict[str, object] = {
        "protocol": "ckks",
        "shapes": [[100, 90], [50]],  # 9050 values: 3 ciphertexts, 2 frames of at most 2
        "aggregation": {"chunk_ciphertexts": 2},
        "limits": {"max_message_bytes": 256 * 1024, "chunk_bytes": 64 * 1024},
        **kwargs,
    }
    return make(names, **options)


def _weighted_mean(
    updates: Mapping[int, Mapping[str, np.ndarray]], weights: Mapping[int, float]
) -> np.ndarray:
    """The plain float64 weighted mean of the flattened ``updates`` (the insecure reference)."""
    total = sum(weights[s] for s in sorted(updates))
    flat = [weights[s] * flatten(dict(updates[s]))[0] for s in sorted(updates)]
    return np.sum(flat, axis=0) / total  # type: ignore[no-any-return]


def reference(
    fed: Federation, rounds: int, survivors: Sequence[Sequence[str]], keys: Path
) -> tuple[tensors.Tensors, float]:
    """The in-process reference model after ``rounds`` rounds (plain float64 weighted mean of the
    survivors' updates) and the largest mean magnitude; checks that the in-process CKKS round
    (:func:`encrypted_mean`) agrees with it within ``REL_TOL``."""
    secret = SecretContext.load(keys / "ckks-secret.ctx")
    public = PublicContext.load(keys / "ckks-public.ctx")
    model = initial_model(load_server_config(fed.server_config).model)
    tasks = fed.tasks()
    peak = 0.0
    for r in range(rounds):
        results = {s: t.compute_update(model, r) for s, t in tasks.items()}
        # Weights: every site that reported (all of them); the mean: the survivors.
        included = [fed.ids[n] for n in survivors[r]]
        mean = _weighted_mean(
            {s: results[s].update for s in included}, {s: results[s].weight for s in included}
        )
        vectors = {str(s): flatten(dict(res.update))[0] for s, res in results.items()}
        ckks_mean, stats = encrypted_mean(
            secret,
            public,
            vectors,
            {str(s): res.weight for s, res in results.items()},
            [str(s) for s in included],
            round_id=r,
        )
        assert stats.max_rel_error < REL_TOL, stats
        assert np.max(np.abs(ckks_mean - mean)) <= REL_TOL * np.max(np.abs(mean))
        peak = max(peak, float(np.max(np.abs(mean))))
        model = apply_mean(model, mean)
    return model, peak


def assert_close(got: tensors.Tensors, want: tensors.Tensors, peak: float, rounds: int) -> None:
    assert list(got) == list(want)
    for name in want:
        g, w = got[name].astype(np.float64), want[name].astype(np.float64)
        # CKKS error per round, plus float32 rounding of the model (one ulp per round).
        atol = rounds * (REL_TOL * peak + 2 * np.finfo(np.float32).eps * float(np.max(np.abs(w))))
        err = float(np.max(np.abs(g - w)))
        assert err <= atol, f"{name}: max error {err:.3g} above {atol:.3g}"


def final_model(fed: Federation, name: str) -> tensors.Tensors:
    return tensors.loads((fed.site_dir(name) / "final_model.tensors").read_bytes())


def test_ckks_rounds_match_the_in_process_mean(federation: Callable[..., Federation]) -> None:
    names = ["a", "b", "c"]
    fed = ckks_federation(federation, names, rounds=2)
    keys = add_ckks(fed)
    fed.start_all()
    codes = fed.wait_all(timeout=90)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()

    expected, peak = reference(fed, 2, [names, names], keys)
    assert peak > 1e-4  # the relative tolerance applies
    for r in range(2):
        record = fed.round_record(r)
        assert record["completed"] and record["aggregation"] == "ckks", record
        assert record["survivors"] == [1, 2, 3] and record["dropped"] == []
        assert "ckks_decryptor" not in record  # nobody decrypts for the server
        assert record["ckks_model_encrypted"] is True
        assert record["ckks_share"] == pytest.approx(1.0)
        # Three uploads of 3 ciphertexts each, at about 7.6 bytes per value (ckks.md).
        assert record["bytes_in"] > 3 * 3 * 8192 * 7
    finals = [final_model(fed, name) for name in names]
    for got in finals:
        assert_close(got, expected, peak, 2)
        # Every site decrypted the same global model (it is one ciphertext).
        for key in got:
            np.testing.assert_array_equal(got[key], finals[0][key])
    for key in ["server", *names]:
        text = fed.log_text(key)
        assert '"level":"error"' not in text, text
    # The server never held the secret key, and its checkpoint is a ciphertext, not a model.
    assert not list(fed.server_config.parent.glob("*secret*"))
    checkpoint = fed.checkpoint()
    assert checkpoint is not None and checkpoint["model_format"] == "ckks-encrypted"
    assert not list(fed.state_dir.glob("model-*.tensors"))
    (blob_path,) = fed.state_dir.glob("model-*.ckks")
    blob = blob_path.read_bytes()
    assert blob.startswith(ckks_wire.MODEL_MAGIC)
    assert '"model_encrypted":true' in fed.log_text("server")
    # With the federation's key (as a site), the checkpoint decrypts to the sites' final model.
    secret = SecretContext.load(keys / "ckks-secret.ctx")
    decrypted = ckks_wire.decrypt_model(secret, blob, expected_round=1)
    for key in decrypted:
        np.testing.assert_array_equal(decrypted[key], finals[0][key])


@pytest.mark.slow
def test_site_killed_before_its_upload_is_a_dropout(
    federation: Callable[..., Federation],
) -> None:
    """Site a reports its weight, then kills itself before uploading its ciphertexts: the upload
    step closes at its deadline, the encrypted global model is the sum of b and c with their share
    of the weight, and b and c decrypt the mean renormalised over b and c."""
    names = ["a", "b", "c"]
    fed = ckks_federation(federation, names, rounds=1, deadlines={"phase_s": 3.0})
    keys = add_ckks(fed)
    fed.patch_site("a", test_crash_before="ckks_upload", test_crash_round=0)
    fed.start_all()
    crashed = fed.procs["a"]
    wait_until(lambda: crashed.poll() is not None, 60, "site a to kill itself")
    assert crashed.returncode == -9, fed.log_text("a")
    codes = fed.wait_all(timeout=60, sites=["b", "c"])
    assert codes == dict.fromkeys(["server", "b", "c"], 0), fed.all_logs()

    record = fed.round_record(0)
    assert record["completed"], record
    assert record["survivors"] == [2, 3] and record["dropped"] == [1]
    weights = {s: t.weight for s, t in fed.tasks().items()}
    assert record["ckks_share"] == pytest.approx((weights[2] + weights[3]) / sum(weights.values()))
    expected, peak = reference(fed, 1, [["b", "c"]], keys)
    assert_close(final_model(fed, "b"), expected, peak, 1)
    assert_close(final_model(fed, "c"), expected, peak, 1)


def test_site_with_another_ckks_key_is_left_out(federation: Callable[..., Federation]) -> None:
    """Site c holds a secret context of another provisioning (its config names that context's
    fingerprint): it refuses the server's round (another fingerprint) and uploads nothing; the
    round completes with a and b."""
    names = ["a", "b", "c"]
    fed = ckks_federation(federation, names, rounds=1, deadlines={"phase_s": 3.0})
    keys = add_ckks(fed, foreign=["c"])
    fed.start_all()
    codes = fed.wait_all(timeout=60)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()
    record = fed.round_record(0)
    assert record["completed"] and record["survivors"] == [1, 2] and record["dropped"] == [3]
    assert "is not the federation's" in fed.log_text("c")
    expected, peak = reference(fed, 1, [["a", "b"]], keys)
    assert_close(final_model(fed, "a"), expected, peak, 1)


def _server_with_ckks(fed: Federation, context: Path, fingerprint: str) -> None:
    fed.patch_server(ckks={"context": str(context), "fingerprint": fingerprint})


def test_server_refuses_a_secret_context_and_a_wrong_fingerprint(
    federation: Callable[..., Federation],
) -> None:
    from secure_fl.transport.server import FederationServer

    fed = ckks_federation(federation, ["a", "b"], rounds=1)
    keys = add_ckks(fed)
    fingerprint = json.loads(fed.server_config.read_text())["ckks"]["fingerprint"]

    # The secret artefact, with the right fingerprint: refused, naming the danger.
    _server_with_ckks(fed, keys / "ckks-secret.ctx", fingerprint)
    with pytest.raises(ConfigError, match="SECRET"):
        FederationServer(load_server_config(fed.server_config))
    # The same through the command line: the process exits non-zero with the reason.
    proc = subprocess.run(
        [sys.executable, "-m", "secure_fl.transport.cli", "server", str(fed.server_config)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert b"SECRET" in proc.stdout + proc.stderr
    assert not (fed.state_dir / "endpoint.json").exists()

    # The public artefact with another fingerprint: refused.
    _server_with_ckks(fed, keys / "ckks-public.ctx", "ab" * 32)
    with pytest.raises(ConfigError, match="fingerprint"):
        FederationServer(load_server_config(fed.server_config))
    # No ckks section at all.
    config = json.loads(fed.server_config.read_text())
    config.pop("ckks")
    fed.server_config.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'ckks' section"):
        FederationServer(load_server_config(fed.server_config))
    # The right one: accepted.
    _server_with_ckks(fed, keys / "ckks-public.ctx", fingerprint)
    FederationServer(load_server_config(fed.server_config))


def test_server_checks_uploads(
    federation: Callable[..., Federation],
) -> None:
    """Site a is driven by hand: uploads under another fingerprint, scaled by another weight, or
    of garbage frames are refused (INVALID_ARGUMENT) and change nothing; its honest upload is then
    accepted, and no instruction ever asks it to decrypt anything."""
    import grpc
    from transport_helpers import site_channel

    from secure_fl.he import Layout, SiteEncryptor
    from secure_fl.transport._generated import federation_pb2 as pb
    from secure_fl.transport._generated.federation_pb2_grpc import FederationStub
    from secure_fl.transport.chunks import iter_chunks
    from secure_fl.transport.config import FEDERATION_PROTOCOL

    # A generous phase deadline: under CPU load the four refused uploads must not push site a past
    # it (it would become a dropout and the round would be retried with other instruction indices).
    fed = ckks_federation(federation, ["a", "b"], rounds=1, deadlines={"phase_s": 60.0})
    keys = add_ckks(fed)
    fed.start_server()
    fed.start_site("b")
    with site_channel(fed, "a") as channel:
        stub = FederationStub(channel)
        session = stub.Join(
            pb.JoinRequest(protocol_version=FEDERATION_PROTOCOL), timeout=10
        ).session

        def poll(index: int, kind: str) -> pb.Instruction:
            for _ in range(100):
                inst = stub.Poll(
                    pb.PollRequest(session=session, attempt=1, next_index=index, wait_ms=1000),
                    timeout=10,
                )
                if inst.WhichOneof("kind") in (kind, "finished"):
                    # "finished" answers every poll once the federation is over: under load the
                    # last round can end before this hand-driven site asks for its outcome.
                    return inst
            raise AssertionError(f"no {kind} instruction")

        poll(0, "round_start")
        stub.ReportUpdateReady(pb.UpdateReady(round_id=0, weight=10.0), timeout=10)
        setup = poll(1, "ckks_setup").ckks_setup
        secret = SecretContext.load(keys / "ckks-secret.ctx")
        layout = Layout(int(setup.vector_length), secret.preset.slots, setup.chunk_ciphertexts)
        vector = np.full(layout.size, 0.25)
        frames = list(SiteEncryptor(secret, layout).stream(vector, factor=setup.weight, round_id=0))

        def upload(data: bytes, **info: object) -> None:
            fields: dict[str, object] = {
                "context_sha256": setup.context_sha256,
                "ciphertexts": layout.ciphertexts,
                "weight": setup.weight,
                **info,
            }
            header = pb.PayloadHeader(
                kind=pb.CKKS_CIPHERTEXT,
                round_id=0,
                length=layout.chunks,
                ckks=pb.CkksPayloadInfo(**fields),  # type: ignore[arg-type]
            )
            stub.UploadCiphertext(iter_chunks(header, data, 60 * 1024), timeout=30)

        good = ckks_wire.pack_frames(frames)
        for data, info in [
            (good, {"context_sha256": b"\x01" * 32}),
            (good, {"weight": setup.weight / 2}),
            (ckks_wire.pack_frames(f[:-1] + b"\x00" for f in frames), {}),
            (ckks_wire.pack_frames(reversed(frames)), {}),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                upload(data, **info)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        upload(good)
        with pytest.raises(grpc.RpcError) as again:
            upload(good)
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        last = poll(2, "outcome")
        if last.WhichOneof("kind") == "outcome":
            assert last.outcome.completed and list(last.outcome.survivors) == [1, 2]
        else:  # the federation ended first; the round record below says the same
            assert last.finished.rounds_completed == 1
        codes = {"server": fed.wait("server", 60), "b": fed.wait("b", 30)}
    assert codes == {"server": 0, "b": 0}, fed.all_logs()
    record = fed.round_record(0)
    assert record["completed"] and record["survivors"] == [1, 2], record
    # The four bad uploads (the duplicate may arrive after the round has already closed).
    assert record["rejected_calls"] >= 4
    # The mean: a's constant 0.25 and b's update, weighted 10 : b's weight.
    model = initial_model(load_server_config(fed.server_config).model)
    b = fed.tasks()[2].compute_update(model, 0)
    want = _weighted_mean(
        {1: {k: np.full(v.shape, 0.25, v.dtype) for k, v in model.items()}, 2: b.update},
        {1: 10.0, 2: b.weight},
    )
    expected = apply_mean(model, want)
    got = tensors.loads((fed.site_dir("b") / "final_model.tensors").read_bytes())
    assert_close(got, expected, float(np.max(np.abs(want))), 1)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_rotate_ckks_replaces_every_key_and_fingerprint(tmp_path: Path) -> None:
    """``secure-fl provision DIR --rotate-ckks``: fresh keys for the server and every site (secrets
    0600), new fingerprints in every config; the old secret and public contexts are refused under
    the new configs, and frames encrypted under the old key are refused by the new server."""
    from secure_fl.errors import RemoteProtocolError
    from secure_fl.he import CiphertextSummer, Layout, SiteEncryptor
    from secure_fl.transport.cli import main as cli_main
    from secure_fl.transport.config import load_site_config
    from secure_fl.transport.provision import provision

    root = tmp_path / "fed"
    done = provision(root, ["a", "b"], protocol="ckks", ckks=True, listen="127.0.0.1:0")
    old_fp = json.loads(done.server_config.read_text())["ckks"]["fingerprint"]
    old_secret = (root / "sites" / "a" / "ckks-secret.ctx").read_bytes()
    old_public = (root / "server" / "ckks-public.ctx").read_bytes()

    assert cli_main(["provision", str(root), "--rotate-ckks"]) == 0
    server = json.loads(done.server_config.read_text())
    new_fp = server["ckks"]["fingerprint"]
    assert new_fp != old_fp and server["ckks"]["context"] == "ckks-public.ctx"
    assert server["roster"] and server["aggregation"]["protocol"] == "ckks"  # the rest is kept
    for name in ("a", "b"):
        site = load_site_config(done.site_configs[name])
        assert site.ckks is not None and site.ckks.fingerprint == new_fp
        assert _mode(site.ckks.context) == 0o600
        assert site.ckks.context.read_bytes() != old_secret
        ckks_wire.load_secret(site.ckks)  # the new key loads
    assert _mode(root / "ckks" / "ckks-secret.ctx") == 0o600
    assert _mode(root / "server" / "ckks-public.ctx") == 0o644
    public = ckks_wire.load_public(load_server_config(done.server_config).ckks)
    assert public.fingerprint == new_fp

    # A site that kept its old key file (the config names the new fingerprint): refused.
    stale = root / "sites" / "a" / "ckks-secret.ctx"
    stale.write_bytes(old_secret)
    with pytest.raises(ConfigError, match="fingerprint"):
        ckks_wire.load_secret(load_site_config(done.site_configs["a"]).ckks)
    # The old public context under the new server config: refused.
    (root / "server" / "ckks-public.ctx").write_bytes(old_public)
    with pytest.raises(ConfigError, match="fingerprint"):
        ckks_wire.load_public(load_server_config(done.server_config).ckks)
    # Ciphertexts under the old key: refused by a server holding the new public context.
    old = SecretContext.from_bytes(old_secret)
    layout = Layout(10, old.preset.slots)
    (frame,) = SiteEncryptor(old, layout).stream(np.zeros(10), factor=0.5, round_id=0)
    with pytest.raises(RemoteProtocolError, match="context"):
        CiphertextSummer(public, layout, round_id=0).add("a", frame)
    # Rotation needs a provisioned folder.
    with pytest.raises(ConfigError, match="not a provisioned federation"):
        from secure_fl.transport.provision import rotate_ckks

        rotate_ckks(tmp_path / "nothing")


@pytest.mark.slow
def test_rotation_between_runs_and_a_site_with_the_old_key_is_left_out(
    federation: Callable[..., Federation],
) -> None:
    """A federation runs one round, its keys are rotated, site c misses the rotation (it keeps
    its old key file while its config names the new fingerprint): a restarted federation with a
    fresh state_dir completes with a and b; c refuses to take part. A server asked to resume a
    checkpoint encrypted under the old key refuses to start."""
    from secure_fl.transport.provision import rotate_ckks
    from secure_fl.transport.server import FederationServer

    names = ["a", "b", "c"]
    # c refuses before it reports a weight: the update step closes at update_s.
    deadlines = {"phase_s": 3.0, "update_s": 4.0}
    fed = ckks_federation(federation, names, rounds=1, deadlines=deadlines)
    add_ckks(fed)
    fed.start_all()
    assert fed.wait_all(timeout=60) == dict.fromkeys(["server", *names], 0), fed.all_logs()
    old_c = (fed.site_dir("c") / "ckks-secret.ctx").read_bytes()

    rotated = rotate_ckks(fed.root)
    assert rotated.previous is not None and rotated.previous != rotated.fingerprint
    # The checkpoint holds the global model encrypted under the old key: no resume.
    with pytest.raises(ConfigError, match="rotated"):
        FederationServer(load_server_config(fed.server_config)).start()
    shutil.rmtree(fed.state_dir)
    (fed.site_dir("c") / "ckks-secret.ctx").write_bytes(old_c)
    for name in names:
        shutil.rmtree(fed.site_dir(name) / "state", ignore_errors=True)
        (fed.site_dir(name) / "final_model.tensors").unlink()
    fed.start_all()
    codes = fed.wait_all(timeout=60)
    assert codes == dict.fromkeys(["server", *names], 0), fed.all_logs()
    record = fed.round_record(0)
    assert record["completed"] and record["survivors"] == [1, 2], record
    assert record["ckks_fingerprint"] == rotated.fingerprint
    assert "fingerprint" in fed.log_text("c")
    assert not (fed.site_dir("c") / "final_model.tensors").exists()
    keys = fed.root / "ckks"  # the rotated artefacts
    expected, peak = reference(fed, 1, [["a", "b"]], keys)
    assert_close(final_model(fed, "a"), expected, peak, 1)


def test_server_resumes_from_its_encrypted_checkpoint(
    federation: Callable[..., Federation],
) -> None:
    """The server stops after round 0 holding only the encrypted global model; a restarted
    server (now configured for 2 rounds) resumes from that ciphertext and the sites decrypt it."""
    names = ["a", "b"]
    fed = ckks_federation(federation, names, rounds=1)
    keys = add_ckks(fed)
    fed.start_all()
    assert fed.wait_all(timeout=60) == dict.fromkeys(["server", *names], 0), fed.all_logs()
    fed.patch_server(rounds=2)
    fed.start_all()
    assert fed.wait_all(timeout=60) == dict.fromkeys(["server", *names], 0), fed.all_logs()
    assert '"completed_rounds":1' in fed.log_text("server").replace(" ", "")
    expected, peak = reference(fed, 2, [names, names], keys)
    assert_close(final_model(fed, "a"), expected, peak, 2)


def test_a_site_checks_the_encrypted_model_before_it_decrypts() -> None:
    """decrypt_model (the site's only decryption): another key, another round, other tensors,
    fewer than 2 contributors, frames missing or of another kind, a lying share that pushes the
    values out of range, and junk are refused; the honest model decrypts to the weighted mean."""
    from secure_fl.errors import DecryptionError, RemoteProtocolError
    from secure_fl.he import Layout, SiteEncryptor, StreamingSum
    from secure_fl.he.wire import decode_frame, encode_frame

    secret, other = SecretContext.generate(), SecretContext.generate()
    structure = (("w", "float32", (30, 200)), ("b", "float64", (7,)))
    size = ckks_wire.structure_size(structure)
    layout = Layout(size, secret.preset.slots, 1)  # 2 ciphertexts, 2 frames
    rng = np.random.default_rng(5)
    models = {"a": rng.standard_normal(size), "b": rng.standard_normal(size)}
    factors = {"a": 0.25, "b": 0.5}  # a third site (0.25) dropped: share 0.75

    def payload(ctx: SecretContext = secret, share: float = 0.75, **changes: object) -> bytes:
        uploads = {
            n: list(SiteEncryptor(ctx, layout).stream(v, factor=factors[n], round_id=4))
            for n, v in models.items()
        }
        summer = StreamingSum(ctx.public(), layout, round_id=4, sites=uploads)
        for name, site_frames in uploads.items():
            summer.open(name)
            for frame in site_frames:
                summer.add_frame(name, frame)
            summer.finish(name)
        summer.close()
        frames = list(summer.sum_frames())
        fields: dict[str, object] = {
            "fingerprint": ctx.fingerprint,
            "round_id": 4,
            "share": share,
            "contributors": 2,
            "chunk_ciphertexts": 1,
            "structure": structure,
            "frames": tuple(frames),
            **changes,
        }
        return ckks_wire.encode_model(ckks_wire.EncryptedModel(**fields))  # type: ignore[arg-type]

    good = payload()
    got = ckks_wire.decrypt_model(secret, good, expected_round=4, expected_structure=structure)
    assert [(k, str(v.dtype), v.shape) for k, v in got.items()] == [
        (name, dtype, shape) for name, dtype, shape in structure
    ]
    flat = np.concatenate([v.astype(np.float64).ravel() for v in got.values()])
    want = (0.25 * models["a"] + 0.5 * models["b"]) / 0.75
    np.testing.assert_allclose(flat, want.astype(np.float32).astype(np.float64), atol=1e-6)

    refused: list[tuple[bytes, dict[str, object], str]] = [
        (good, {"expected_round": 3}, "round 4"),
        (
            good,
            {"expected_structure": (("w", "float32", (6000,)), ("b", "float64", (7,)))},
            "tensors",
        ),
        (good, {"expected_size": 6006}, "expects 6006"),
        (payload(contributors=1), {}, "at least 2"),
        (payload(frames=()), {}, "frames"),
        (good[:-5], {}, "digest|truncated|runs past"),
        (b"junk" * 10, {}, "magic"),
    ]
    for data, options, match in refused:
        with pytest.raises(RemoteProtocolError, match=match):
            ckks_wire.decrypt_model(secret, data, **options)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError, match="not the federation's"):
        ckks_wire.decrypt_model(secret, payload(ctx=other))
    # A forged fingerprint over another key's ciphertexts: caught when decrypting (out of range).
    with pytest.raises((DecryptionError, RemoteProtocolError)):
        ckks_wire.decrypt_model(secret, payload(ctx=other, fingerprint=secret.fingerprint))
    # A site frame presented as the model (kind 1): refused by the frame check.
    model = ckks_wire.decode_model(good)
    site_frames = tuple(
        encode_frame(
            kind=1,
            fingerprint=f.fingerprint,
            round_id=f.round_id,
            chunk=f.chunk,
            values=f.values,
            contributors=2,
            blobs=list(f.blobs),
        )
        for f in map(decode_frame, model.frames)
    )
    with pytest.raises(RemoteProtocolError, match="not a sum"):
        ckks_wire.decrypt_model(secret, payload(frames=site_frames))
    # A lying share that blows the values past the preset's bound.
    with pytest.raises(DecryptionError, match="beyond the bound"):
        ckks_wire.decrypt_model(secret, payload(share=1e-6))
