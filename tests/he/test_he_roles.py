"""The three CKKS roles one by one: site encryptor, server summer, site decryptor, and the frames."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tenseal as ts

from secure_fl.errors import (
    ConfigError,
    DecryptionError,
    InvalidUpdateError,
    RemoteProtocolError,
    SecureFLError,
)
from secure_fl.he import (
    CiphertextSummer,
    Layout,
    SecretContext,
    SiteEncryptor,
    SumDecryptor,
)
from secure_fl.he.wire import KIND_SITE, decode_frame, encode_frame


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate()


@pytest.fixture(scope="module")
def other() -> SecretContext:
    return SecretContext.generate()


LAYOUT = Layout(size=10_000, slots=4096, chunk_ciphertexts=2)  # chunks of 2 + 1 ciphertexts


def _vector(seed: int, size: int = LAYOUT.size, scale: float = 0.01) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(size)


def _run(
    secret: SecretContext, vectors: dict[str, np.ndarray], factors: dict[str, float]
) -> np.ndarray:
    enc = SiteEncryptor(secret, LAYOUT)
    summer = CiphertextSummer(secret.public(), LAYOUT, round_id=7)
    dec = SumDecryptor(secret, LAYOUT, round_id=7)
    out = np.empty(LAYOUT.size)
    for chunk in range(LAYOUT.chunks):
        start, stop = LAYOUT.chunk_range(chunk)
        for site, vec in vectors.items():
            frame = enc.encrypt_chunk(
                vec[start:stop], chunk=chunk, factor=factors[site], round_id=7
            )
            summer.add(site, frame)
        assert summer.pending == (chunk,)
        out[start:stop] = dec.decrypt(
            summer.pop(chunk, expected=list(vectors)), chunk=chunk, contributors=len(vectors)
        )
    assert summer.pending == () and summer.peak_pending == 1
    return out


def test_layout_uses_every_slot_and_bounds_chunks() -> None:
    assert LAYOUT.ciphertexts == 3 and LAYOUT.chunks == 2
    assert LAYOUT.pieces(0) == [4096, 4096] and LAYOUT.pieces(1) == [10_000 - 8192]
    assert Layout(4096 * 1172, 4096, 64).pieces(18) == [4096] * 20
    big = Layout(4_800_000, 4096)
    assert big.ciphertexts == 1172 and all(
        len(big.pieces(c)) <= big.chunk_ciphertexts for c in range(big.chunks)
    )
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError):
            Layout(bad, 4096)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        LAYOUT.chunk_range(2)


def test_weighted_sum_of_three_sites(secret: SecretContext) -> None:
    vectors = {f"s{i}": _vector(i) for i in range(3)}
    factors = {"s0": 0.5, "s1": 0.3, "s2": 0.2}
    got = _run(secret, vectors, factors)
    want = sum(factors[s] * v for s, v in vectors.items())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_extreme_values_at_the_bound_do_not_overflow(secret: SecretContext) -> None:
    bound = secret.preset.max_abs
    size = LAYOUT.size
    vectors = {
        "a": np.full(size, bound),
        "b": np.full(size, bound),
        "c": np.where(np.arange(size) % 2 == 0, -bound, bound),
    }
    factors = {"a": 0.25, "b": 0.25, "c": 0.5}
    got = _run(secret, vectors, factors)
    want = 0.5 * bound + 0.5 * vectors["c"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.max(np.abs(got)) == pytest.approx(bound, rel=1e-9)


@pytest.mark.parametrize(
    "bad",
    [np.full(LAYOUT.size, np.nan), np.full(LAYOUT.size, np.inf), np.full(LAYOUT.size, 513.0)],
)
def test_values_that_could_overflow_are_refused(secret: SecretContext, bad: np.ndarray) -> None:
    enc = SiteEncryptor(secret, LAYOUT)
    with pytest.raises(InvalidUpdateError):
        enc.check_update(bad, site="s")
    with pytest.raises(InvalidUpdateError):
        next(enc.stream(bad, factor=1.0, round_id=0))
    with pytest.raises(InvalidUpdateError):
        enc.encrypt_chunk(bad[:8192], chunk=0, factor=1.0, round_id=0)


def test_encryptor_checks_its_arguments(secret: SecretContext) -> None:
    enc = SiteEncryptor(secret, LAYOUT)
    vec = _vector(0)
    for factor in (0.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ConfigError):
            enc.encrypt_chunk(vec[:8192], chunk=0, factor=factor, round_id=0)
    with pytest.raises(InvalidUpdateError):
        enc.encrypt_chunk(vec[:100], chunk=0, factor=1.0, round_id=0)
    with pytest.raises(InvalidUpdateError):
        enc.check_update(vec[:-1])
    with pytest.raises(ConfigError):
        SiteEncryptor(secret, Layout(10, 8192))
    with pytest.raises(ConfigError):
        SiteEncryptor(secret.public(), LAYOUT)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(enc)


def test_server_refuses_a_secret_context(secret: SecretContext) -> None:
    with pytest.raises(ConfigError, match="could read every site's update"):
        CiphertextSummer(secret, LAYOUT, round_id=0)  # type: ignore[arg-type]


def test_mismatched_contexts_fail_loudly(secret: SecretContext, other: SecretContext) -> None:
    with pytest.raises(ConfigError, match="not the federation's"):
        SiteEncryptor(other, LAYOUT, expected_fingerprint=secret.fingerprint)
    with pytest.raises(ConfigError, match="not the federation's"):
        CiphertextSummer(
            other.public(), LAYOUT, round_id=0, expected_fingerprint=secret.fingerprint
        )
    # a site using another federation's key: the server refuses its frame
    frame = SiteEncryptor(other, LAYOUT).encrypt_chunk(
        _vector(1)[:8192], chunk=0, factor=1.0, round_id=0
    )
    summer = CiphertextSummer(secret.public(), LAYOUT, round_id=0)
    with pytest.raises(RemoteProtocolError, match="mixed keys"):
        summer.add("s", frame)
    assert summer.pending == ()
    # a sum made under another context: the site refuses it
    other_summer = CiphertextSummer(other.public(), LAYOUT, round_id=0)
    other_summer.add("s", frame)
    with pytest.raises(RemoteProtocolError, match="mixed keys"):
        SumDecryptor(secret, LAYOUT, round_id=0).decrypt(other_summer.pop(0), chunk=0)


def _site_frame(secret: SecretContext, chunk: int = 0, round_id: int = 0) -> bytes:
    start, stop = LAYOUT.chunk_range(chunk)
    return SiteEncryptor(secret, LAYOUT).encrypt_chunk(
        _vector(3)[start:stop], chunk=chunk, factor=1.0, round_id=round_id
    )


@pytest.mark.parametrize("position", [0, 8, 12, 50, 70, 1000, 60_000, 200_000, -33, -1])
def test_corrupted_frames_are_refused_before_anything_is_added(
    secret: SecretContext, position: int
) -> None:
    frame = bytearray(_site_frame(secret))
    frame[position] ^= 0x01
    summer = CiphertextSummer(secret.public(), LAYOUT, round_id=0)
    with pytest.raises(RemoteProtocolError, match="site 's'"):
        summer.add("s", bytes(frame))
    assert summer.pending == ()


@pytest.mark.parametrize("keep", [0, 10, 65, 66, 1000, -1])
def test_truncated_frames_are_refused(secret: SecretContext, keep: int) -> None:
    frame = _site_frame(secret)
    summer = CiphertextSummer(secret.public(), LAYOUT, round_id=0)
    with pytest.raises(RemoteProtocolError):
        summer.add("s", frame[:keep])
    with pytest.raises(RemoteProtocolError):
        summer.add("s", frame + b"\x00")


def _reframe(frame: bytes, blobs: list[bytes]) -> bytes:
    parsed = decode_frame(frame)
    return encode_frame(
        kind=parsed.kind,
        fingerprint=parsed.fingerprint,
        round_id=parsed.round_id,
        chunk=parsed.chunk,
        values=parsed.values,
        contributors=parsed.contributors,
        blobs=blobs,
    )


def test_ciphertexts_that_do_not_parse_are_refused_even_with_a_valid_digest(
    secret: SecretContext,
) -> None:
    frame = _site_frame(secret)
    blobs = list(decode_frame(frame).blobs)
    rng = np.random.default_rng(0)
    variants = [
        rng.bytes(len(blobs[0])),  # noise
        blobs[0][: len(blobs[0]) // 2],  # truncated ciphertext
        b"",
    ]
    for bad in variants:
        summer = CiphertextSummer(secret.public(), LAYOUT, round_id=0)
        with pytest.raises(RemoteProtocolError, match="ciphertext 0"):
            summer.add("s", _reframe(frame, [bad, blobs[1]]))
        assert summer.pending == ()
    # a ciphertext holding fewer values than the layout needs
    short = ts.ckks_vector(secret.tenseal_context, [0.5] * 10).serialize()
    with pytest.raises(RemoteProtocolError, match="holds 10 values"):
        CiphertextSummer(secret.public(), LAYOUT, round_id=0).add(
            "s", _reframe(frame, [short, blobs[1]])
        )
    # a ciphertext at another scale
    scaled = ts.ckks_vector(secret.tenseal_context, [0.5] * 4096, scale=2.0**40).serialize()
    with pytest.raises(RemoteProtocolError, match="scale"):
        CiphertextSummer(secret.public(), LAYOUT, round_id=0).add(
            "s", _reframe(frame, [scaled, blobs[1]])
        )


def test_foreign_key_with_a_forged_fingerprint_is_caught_at_decryption(
    secret: SecretContext, other: SecretContext
) -> None:
    """Same parameters, another key, frame relabelled with our fingerprint: the server cannot tell,
    but the decrypted sum is garbage far beyond the bound, and the site refuses it."""
    foreign = decode_frame(_site_frame(other))
    frame = encode_frame(
        kind=KIND_SITE,
        fingerprint=secret.fingerprint,
        round_id=0,
        chunk=0,
        values=foreign.values,
        contributors=1,
        blobs=list(foreign.blobs),
    )
    summer = CiphertextSummer(secret.public(), LAYOUT, round_id=0)
    summer.add("s", frame)
    with pytest.raises(DecryptionError, match="another key"):
        SumDecryptor(secret, LAYOUT, round_id=0).decrypt(summer.pop(0), chunk=0)


def test_replays_duplicates_and_missing_sites_are_refused(secret: SecretContext) -> None:
    summer = CiphertextSummer(secret.public(), LAYOUT, round_id=1)
    with pytest.raises(RemoteProtocolError, match="round 0"):
        summer.add("a", _site_frame(secret, round_id=0))
    summer.add("a", _site_frame(secret, round_id=1))
    with pytest.raises(RemoteProtocolError, match="already added"):
        summer.add("a", _site_frame(secret, round_id=1))
    with pytest.raises(RemoteProtocolError, match=r"missing from \['b'\]"):
        summer.pop(0, expected=["a", "b"])
    with pytest.raises(RemoteProtocolError, match="no site frame"):
        summer.pop(1)
    summed = summer.pop(0, expected=["a"])
    dec = SumDecryptor(secret, LAYOUT, round_id=1)
    with pytest.raises(RemoteProtocolError, match="expected round 1, chunk 1"):
        dec.decrypt(summed, chunk=1)
    with pytest.raises(RemoteProtocolError, match="sums 1 sites, expected 2"):
        dec.decrypt(summed, chunk=0, contributors=2)
    with pytest.raises(RemoteProtocolError, match="not a sum frame"):
        dec.decrypt(_site_frame(secret, round_id=1), chunk=0)
    with pytest.raises(RemoteProtocolError, match="not a site contribution"):
        CiphertextSummer(secret.public(), LAYOUT, round_id=1).add("a", summed)
    np.testing.assert_allclose(dec.decrypt(summed, chunk=0), _vector(3)[:8192], rtol=0, atol=1e-9)


def test_corrupted_sum_frame_fails_at_the_site(secret: SecretContext) -> None:
    summer = CiphertextSummer(secret.public(), LAYOUT, round_id=0)
    summer.add("a", _site_frame(secret))
    summed = bytearray(summer.pop(0))
    summed[5000] ^= 0x80
    with pytest.raises(RemoteProtocolError, match="digest"):
        SumDecryptor(secret, LAYOUT, round_id=0).decrypt(bytes(summed), chunk=0)


def test_frame_round_trip() -> None:
    blobs = [b"abc", b"", bytes(range(256))]
    fingerprint = hashlib.sha256(b"x").hexdigest()
    frame = encode_frame(
        kind=KIND_SITE,
        fingerprint=fingerprint,
        round_id=2**64 - 1,
        chunk=3,
        values=9,
        contributors=1,
        blobs=blobs,
    )
    parsed = decode_frame(frame)
    assert parsed.blobs == tuple(blobs) and parsed.fingerprint == fingerprint
    assert (parsed.round_id, parsed.chunk, parsed.values, parsed.contributors) == (
        2**64 - 1,
        3,
        9,
        1,
    )
    for junk in (b"", b"SFLCKKSF" + bytes(100), "frame", None):
        with pytest.raises(SecureFLError):
            decode_frame(junk)  # type: ignore[arg-type]
