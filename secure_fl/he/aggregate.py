"""Encrypted weighted sum with CKKS: the three roles, and a streaming round that plays them all.

The one rule (``protocols/ckks.md``): **no CKKS decryption ever leaves a site.** The server holds
ciphertexts only; every site decrypts the encrypted aggregate itself and keeps the result. A raw
decryption of a ciphertext the server knows (``c0 + c1 * s`` rounded) would let the server solve
for the secret key ``s`` (Li and Micciancio, EUROCRYPT 2021), so no message, no API of the server
role and no report returns one to it.

Roles, kept apart so that each holds only what it needs (here the site's encryptor; the server's
summer is in :mod:`secure_fl.he.summer`, the decryptor in :mod:`secure_fl.he.decrypt`, their
shared checks in :mod:`secure_fl.he.backend`; every name is importable from here):

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
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError, CryptoError, InvalidUpdateError
from secure_fl.he.backend import (
    _RANGE_SLACK,
    _TENSEAL_ERRORS,
    FloatVector,
    _check_layout,
    _check_round,
    _encryptor,
    _loader,
    _raw_vector,
)
from secure_fl.he.context import SecretContext, check_fingerprint, tenseal
from secure_fl.he.packing import Layout, split_chunk
from secure_fl.he.summer import CiphertextSummer
from secure_fl.he.wire import KIND_SITE, encode_frame

if TYPE_CHECKING:
    from secure_fl.he.parallel import EncryptionPool


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


_MOVED = ("SumDecryptor", "RoundStats", "encrypted_mean")


def __getattr__(name: str) -> Any:
    # SumDecryptor, RoundStats and encrypted_mean live in secure_fl.he.decrypt (this module was
    # over 400 lines); they stay importable from here. Lazy, because decrypt imports this module.
    if name in _MOVED:
        from secure_fl.he import decrypt

        return getattr(decrypt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "_RANGE_SLACK",
    "_TENSEAL_ERRORS",
    "CiphertextSummer",
    "FloatVector",
    "SiteEncryptor",
    "_check_layout",
    "_check_round",
    "_encryptor",
    "_loader",
    "_raw_vector",
]
