"""Encrypted weighted sum with CKKS: the three roles, and a streaming round that plays them all.

The one rule (``protocols/ckks.md``): **no CKKS decryption ever leaves a site.** The server holds
ciphertexts only; every site decrypts the encrypted aggregate itself and keeps the result. A raw
decryption of a ciphertext the server knows (``c0 + c1 * s`` rounded) would let the server solve
for the secret key ``s`` (Li and Micciancio, EUROCRYPT 2021), so no message, no API of the server
role and no report returns one to it.

Roles, kept apart so that each holds only what it needs:

* :class:`SiteEncryptor` (a site; holds the secret context) checks its update (finite, every value
  within the preset's ``max_abs``), scales it by its public normalised weight
  ``weight / total_weight`` and encrypts it chunk by chunk into frames (:mod:`secure_fl.he.wire`).
* :class:`CiphertextSummer` (the server; holds only the public context and refuses a secret one)
  checks every frame (digest, fingerprint, round, chunk, sizes, scale, level) before it adds
  anything, and adds the sites' ciphertexts chunk by chunk.
* :class:`SumDecryptor` (a site again, locally) decrypts the summed chunk, refuses values outside
  the bound (corruption or a foreign key), and the caller divides by the survivors' share of the
  weight. Its output is for the site itself: nothing decrypted is ever sent to the server.

Dropouts: a site that never sends is simply absent from the sum; the decryptor divides by the
survivors' total normalised weight ``S = sum(weight_i for survivors) / total_weight``, which
renormalises the mean over the survivors. Because every encrypted value is at most ``max_abs`` in
magnitude and the normalised weights sum to at most one, no sum of any subset of sites can exceed
``max_abs``: overflow is impossible by construction.

Streaming and memory: :func:`encrypted_mean` runs chunk-major (chunk 0 of every site, its sum, its
decryption, then chunk 1, ...). At any time it holds the ciphertexts of one chunk: one site's
frame, the server's running sum and the sum's frame, about ``3 * chunk_ciphertexts * 2N * 8`` bytes
(25 MB at N = 8192 with the default 64 ciphertexts per chunk), plus one chunk of plaintext
values; this does not grow with the model size or the number of sites.

Errors raised on purpose (TenSEAL exceptions never escape): InvalidUpdateError for NaN, Inf or
values beyond ``max_abs``; ConfigError for mismatched layouts, contexts or fingerprints and for a
server given a secret context; RemoteProtocolError for a frame that is corrupted, truncated, of
another federation, round or chunk, or whose ciphertexts do not parse or have the wrong size, scale
or level; DecryptionError when a decrypted sum is out of range (a corrupted ciphertext or one
encrypted under another key); CryptoError if TenSEAL fails to encrypt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import (
    ConfigError,
    CryptoError,
    InvalidUpdateError,
    RemoteProtocolError,
)
from secure_fl.he.context import PublicContext, SecretContext, check_fingerprint, tenseal
from secure_fl.he.packing import Layout, split_chunk
from secure_fl.he.wire import KIND_SITE, KIND_SUM, decode_frame, encode_frame

if TYPE_CHECKING:
    from secure_fl.he.parallel import EncryptionPool

FloatVector = npt.NDArray[np.float64]

# TenSEAL raises these (and pybind11 maps C++ exceptions onto them); all are caught at the boundary.
_TENSEAL_ERRORS = (RuntimeError, ValueError, TypeError, OverflowError, MemoryError)

# Decrypted sums may exceed the bound by at most this fraction of it (the noise is about 1e-10).
_RANGE_SLACK = 2.0**-20


def _check_layout(layout: Layout, slots: int) -> None:
    if not isinstance(layout, Layout):
        raise ConfigError(f"layout must be a Layout, got {type(layout).__name__}")
    if layout.slots != slots:
        raise ConfigError(
            f"the layout has {layout.slots} slots per ciphertext but the preset has {slots}"
        )


def _check_round(round_id: int) -> int:
    if isinstance(round_id, bool) or not isinstance(round_id, int) or not 0 <= round_id < 2**64:
        raise ConfigError(f"round_id must be an integer in [0, 2**64), got {round_id!r}")
    return round_id


def _raw_vector(ts: Any) -> Any:
    """TenSEAL's C++ ``CKKSVector`` class, or None if this TenSEAL build does not expose it."""
    return getattr(getattr(ts, "_ts_cpp", None), "CKKSVector", None)


def _encryptor(ts: Any, ctx: Any) -> Any:
    """The fastest TenSEAL entry point for "encrypt this list of floats".

    ``_ts_cpp.CKKSVector(ctx, list)`` skips the Python wrapper's PlainTensor round trip (about 15 %
    of the encryption time); the public ``ckks_vector`` is the fallback.
    """
    raw = _raw_vector(ts)
    if raw is not None:
        data = ctx.data
        return lambda values: raw(data, values)
    return lambda values: ts.ckks_vector(ctx, values)


def _loader(ts: Any, ctx: Any) -> Any:
    """The fastest TenSEAL entry point for "deserialise this CKKS vector under ``ctx``".

    ``_ts_cpp.CKKSVector(ctx, bytes)`` (SEAL checks every coefficient against its modulus) saves
    the Python wrapper's overhead, about a quarter of the cost; ``ckks_vector_from`` is the
    fallback.
    """
    raw = _raw_vector(ts)
    if raw is not None:
        data = ctx.data
        return lambda blob: raw(data, blob)
    return lambda blob: ts.ckks_vector_from(ctx, blob)


class SiteEncryptor:
    """Encrypts one site's update, scaled by its normalised weight, into chunk frames.

    Errors: ConfigError if ``secret`` is not a SecretContext, the layout does not match its preset
    or its fingerprint is not ``expected_fingerprint``; see :meth:`check_update` and
    :meth:`encrypt_chunk`.
    """

    def __init__(
        self,
        secret: SecretContext,
        layout: Layout,
        *,
        expected_fingerprint: str | None = None,
    ) -> None:
        if not isinstance(secret, SecretContext):
            raise ConfigError(f"a site needs a SecretContext, got {type(secret).__name__}")
        check_fingerprint(secret.fingerprint, expected_fingerprint, "the site's secret context")
        _check_layout(layout, secret.preset.slots)
        self._secret = secret
        self.layout = layout
        self._encrypt = _encryptor(tenseal(), secret.tenseal_context)

    def __repr__(self) -> str:
        return f"SiteEncryptor({self._secret!r}, {self.layout!r})"

    def __reduce__(self) -> Any:
        raise TypeError("SiteEncryptor holds the CKKS secret key and cannot be pickled")

    def check_update(self, vector: npt.NDArray[Any], *, site: str | None = None) -> None:
        """Refuse anything the preset cannot carry exactly.

        Errors: InvalidUpdateError when ``vector`` is not a 1-D real array of ``layout.size``
        values, holds NaN or Inf, or holds a magnitude above the preset's ``max_abs`` (the message
        gives the largest magnitude and the bound; nothing is clipped).
        """
        who = f"site {site!r}: " if site is not None else ""
        if not isinstance(vector, np.ndarray) or vector.ndim != 1:
            raise InvalidUpdateError(f"{who}the update must be a 1-D numpy array")
        if not (
            np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)
        ):
            raise InvalidUpdateError(f"{who}the update must be real, got dtype {vector.dtype}")
        if vector.shape[0] != self.layout.size:
            raise InvalidUpdateError(
                f"{who}the update has {vector.shape[0]} values, the layout expects "
                f"{self.layout.size}"
            )
        if vector.size == 0:
            return
        with np.errstate(invalid="ignore"):
            peak = float(np.max(np.abs(vector)))
        if not math.isfinite(peak):
            bad = int(np.count_nonzero(~np.isfinite(vector)))
            raise InvalidUpdateError(
                f"{who}the update holds {bad} NaN/Inf values; CKKS cannot encrypt them"
            )
        bound = self._secret.preset.max_abs
        if peak > bound:
            raise InvalidUpdateError(
                f"{who}the update holds a value of magnitude {peak:.6g} above the bound "
                f"{bound:g} of CKKS preset {self._secret.preset.name!r} (its sum could overflow); "
                "clip or rescale the update, or choose a preset with a larger max_abs"
            )

    def encrypt_chunk(
        self, values: npt.NDArray[Any], *, chunk: int, factor: float, round_id: int
    ) -> bytes:
        """Encrypt ``factor * values`` (the chunk's raw values) into one site frame.

        ``factor`` is the site's normalised weight ``weight / total_weight`` in ``(0, 1]``.

        Errors: ConfigError for a bad factor, round or chunk; InvalidUpdateError for values of the
        wrong length, non-finite or beyond the bound; CryptoError if TenSEAL fails.
        """
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int | float)
            or not 0 < float(factor) <= 1
        ):
            raise ConfigError(f"factor must be a normalised weight in (0, 1], got {factor!r}")
        round_id = _check_round(round_id)
        start, stop = self.layout.chunk_range(chunk)
        if not isinstance(values, np.ndarray) or values.shape != (stop - start,):
            raise InvalidUpdateError(
                f"chunk {chunk} must hold {stop - start} values, got "
                f"{getattr(values, 'shape', type(values).__name__)}"
            )
        self._check_values(values)
        scaled = np.asarray(values, dtype=np.float64) * float(factor)
        blobs: list[bytes] = []
        try:
            for piece in split_chunk(scaled, self.layout.slots):
                blobs.append(self._encrypt(piece.tolist()).serialize())
        except _TENSEAL_ERRORS as exc:
            raise CryptoError(f"TenSEAL failed to encrypt chunk {chunk}: {exc}") from exc
        return encode_frame(
            kind=KIND_SITE,
            fingerprint=self._secret.fingerprint,
            round_id=round_id,
            chunk=chunk,
            values=stop - start,
            contributors=1,
            blobs=blobs,
        )

    def _check_values(self, values: npt.NDArray[Any]) -> None:
        if values.size == 0:
            return
        with np.errstate(invalid="ignore"):
            peak = float(np.max(np.abs(values)))
        if not math.isfinite(peak) or peak > self._secret.preset.max_abs:
            raise InvalidUpdateError(
                f"chunk values must be finite and at most {self._secret.preset.max_abs:g} in "
                f"magnitude, got a peak of {peak:.6g}"
            )

    def stream(
        self,
        vector: npt.NDArray[Any],
        *,
        factor: float,
        round_id: int,
        site: str | None = None,
        pool: EncryptionPool | None = None,
    ) -> Iterator[bytes]:
        """Check the whole ``vector`` first, then yield its frames chunk by chunk.

        With ``pool`` (an :class:`~secure_fl.he.parallel.EncryptionPool` of the same context) the
        chunks are encrypted in its worker processes, at most ``2 * workers`` at a time.

        Errors: as :meth:`check_update` (raised before the first frame) and :meth:`encrypt_chunk`;
        ConfigError for a pool of another context.
        """
        self.check_update(vector, site=site)
        if pool is None:
            for chunk in range(self.layout.chunks):
                start, stop = self.layout.chunk_range(chunk)
                yield self.encrypt_chunk(
                    vector[start:stop], chunk=chunk, factor=factor, round_id=round_id
                )
            return
        check_fingerprint(pool.fingerprint, self._secret.fingerprint, "the encryption pool")
        layout = self.layout
        tasks = (
            (layout, vector[slice(*layout.chunk_range(c))], c, float(factor), round_id)
            for c in range(layout.chunks)
        )
        for frame, _ in pool.ordered(tasks):
            yield frame


class CiphertextSummer:
    """The server: adds the sites' chunk frames under the public context.

    ``add`` validates a whole frame (every check below) before it adds any of its ciphertexts, so a
    bad frame leaves the running sum untouched. ``pop`` hands out a chunk's sum and forgets it.

    Errors: ConfigError when given a SecretContext or any context holding a secret key (such a
    server could read every site's update), a mismatched layout or fingerprint.
    """

    def __init__(
        self,
        public: PublicContext,
        layout: Layout,
        *,
        round_id: int,
        expected_fingerprint: str | None = None,
    ) -> None:
        if isinstance(public, SecretContext):
            raise ConfigError(
                "the server was given the SECRET context: a server holding the secret key could "
                "read every site's update; give it SecretContext.public() or the public artefact"
            )
        if not isinstance(public, PublicContext):
            raise ConfigError(f"the server needs a PublicContext, got {type(public).__name__}")
        ctx = public.tenseal_context
        if ctx.is_private() or ctx.has_secret_key():  # defence in depth; PublicContext refuses
            raise ConfigError("the server's context holds a secret key; refusing to aggregate")
        check_fingerprint(public.fingerprint, expected_fingerprint, "the server's public context")
        _check_layout(layout, public.preset.slots)
        self._public = public
        self._load_vector = _loader(tenseal(), ctx)
        self._parms_id = list(ctx.seal_context().data.first_parms_id())
        self.layout = layout
        self.round_id = _check_round(round_id)
        self._sums: dict[int, list[Any]] = {}
        self._contributors: dict[int, list[str]] = {}
        #: Largest number of chunk sums held at once (1 when driven chunk-major).
        self.peak_pending = 0

    def __repr__(self) -> str:
        return f"CiphertextSummer({self._public!r}, round={self.round_id})"

    @property
    def pending(self) -> tuple[int, ...]:
        """Chunks with a running sum not yet popped."""
        return tuple(sorted(self._sums))

    def contributors(self, chunk: int) -> tuple[str, ...]:
        """Sites whose frame for ``chunk`` has been added, in arrival order."""
        return tuple(self._contributors.get(chunk, ()))

    def add(self, site: str, frame: bytes) -> None:
        """Check ``frame`` (from ``site``) completely, then add its ciphertexts into the chunk sum.

        Errors: RemoteProtocolError naming the site and chunk when the frame is corrupted or
        truncated, is not a site frame, carries another fingerprint, round or chunk, repeats a
        site, has the wrong number of values or ciphertexts, or holds a ciphertext that does not
        parse or has the wrong size, scale, level or is transparent (unencrypted).
        """
        if not isinstance(site, str) or not site:
            raise ConfigError(f"site must be a non-empty string, got {site!r}")
        try:
            parsed = decode_frame(frame)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"site {site!r}: {exc}") from None
        where = f"site {site!r}, chunk {parsed.chunk}"
        if parsed.kind != KIND_SITE or parsed.contributors != 1:
            raise RemoteProtocolError(f"{where}: not a site contribution frame")
        if parsed.fingerprint != self._public.fingerprint:
            raise RemoteProtocolError(
                f"{where}: encrypted under context {parsed.fingerprint[:16]}..., not the "
                f"federation's {self._public.fingerprint[:16]}... (mixed keys or parameters)"
            )
        if parsed.round_id != self.round_id:
            raise RemoteProtocolError(
                f"{where}: frame of round {parsed.round_id}, this is round {self.round_id}"
            )
        if not 0 <= parsed.chunk < self.layout.chunks:
            raise RemoteProtocolError(f"{where}: no such chunk (there are {self.layout.chunks})")
        if site in self._contributors.get(parsed.chunk, ()):
            raise RemoteProtocolError(f"{where}: this site's frame was already added")
        pieces = self.layout.pieces(parsed.chunk)
        start, stop = self.layout.chunk_range(parsed.chunk)
        if parsed.values != stop - start or len(parsed.blobs) != len(pieces):
            raise RemoteProtocolError(
                f"{where}: {parsed.values} values in {len(parsed.blobs)} ciphertexts, expected "
                f"{stop - start} in {len(pieces)}"
            )
        vectors = [
            self._load(blob, expected, f"{where}, ciphertext {i}")
            for i, (blob, expected) in enumerate(zip(parsed.blobs, pieces, strict=True))
        ]
        running = self._sums.get(parsed.chunk)
        if running is None:
            self._sums[parsed.chunk] = vectors
            self.peak_pending = max(self.peak_pending, len(self._sums))
        else:
            try:
                for acc, vec in zip(running, vectors, strict=True):
                    acc.add_(vec)
            except _TENSEAL_ERRORS as exc:  # pragma: no cover - _load checks what add_ needs
                raise RemoteProtocolError(f"{where}: ciphertexts cannot be added: {exc}") from exc
        self._contributors.setdefault(parsed.chunk, []).append(site)

    def _load(self, blob: bytes, expected: int, where: str) -> Any:
        try:
            vec = self._load_vector(blob)
            size = int(vec.size())
            cts = vec.ciphertext()
            ok = (
                len(cts) == 1
                and int(cts[0].size()) == 2
                and float(cts[0].scale) == self._public.preset.scale
                and list(cts[0].parms_id()) == self._parms_id
                and bool(cts[0].is_ntt_form())
                and not bool(cts[0].is_transparent())
            )
        except _TENSEAL_ERRORS as exc:
            raise RemoteProtocolError(
                f"{where}: the ciphertext does not parse under the federation's parameters "
                f"(corrupted, or made with other parameters): {exc}"
            ) from None
        if size != expected:
            raise RemoteProtocolError(f"{where}: holds {size} values, expected {expected}")
        if not ok:
            raise RemoteProtocolError(
                f"{where}: not a fresh two-component ciphertext at the federation's scale and level"
            )
        return vec

    def pop(self, chunk: int, *, expected: Sequence[str] | None = None) -> bytes:
        """The sum frame of ``chunk``; the running sum is then forgotten.

        With ``expected`` (the sites the server announces as included), the contributors must be
        exactly those sites.

        Errors: RemoteProtocolError when no site contributed to the chunk or the contributors
        differ from ``expected``; CryptoError if TenSEAL fails to serialise.
        """
        if chunk not in self._sums:
            raise RemoteProtocolError(f"chunk {chunk}: no site frame was added")
        got = self._contributors[chunk]
        if expected is not None and sorted(got) != sorted(expected):
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            raise RemoteProtocolError(
                f"chunk {chunk}: contributions missing from {missing}, unexpected from {extra}"
            )
        vectors = self._sums.pop(chunk)
        contributors = len(self._contributors.pop(chunk))
        start, stop = self.layout.chunk_range(chunk)
        try:
            blobs = [vec.serialize() for vec in vectors]
        except _TENSEAL_ERRORS as exc:  # pragma: no cover
            raise CryptoError(f"TenSEAL failed to serialise the sum of chunk {chunk}") from exc
        return encode_frame(
            kind=KIND_SUM,
            fingerprint=self._public.fingerprint,
            round_id=self.round_id,
            chunk=chunk,
            values=stop - start,
            contributors=contributors,
            blobs=blobs,
        )


_MOVED = ("SumDecryptor", "RoundStats", "encrypted_mean")


def __getattr__(name: str) -> Any:
    # SumDecryptor, RoundStats and encrypted_mean live in secure_fl.he.decrypt (this module was
    # over 400 lines); they stay importable from here. Lazy, because decrypt imports this module.
    if name in _MOVED:
        from secure_fl.he import decrypt

        return getattr(decrypt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
