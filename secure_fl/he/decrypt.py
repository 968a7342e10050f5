"""The site's view of a round and the in-process mean: :class:`SumDecryptor`, :class:`RoundStats`
and :func:`encrypted_mean` (split from :mod:`secure_fl.he.aggregate`, which re-exports them).

:class:`SumDecryptor` decrypts a summed chunk **at a site, for that site**: no decryption ever goes
to the server (``protocols/ckks.md``). :func:`encrypted_mean` runs one in-process round through the
round halves of :mod:`secure_fl.rounds.ckks` (the one CKKS recipe).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import (
    ConfigError,
    DecryptionError,
    RemoteProtocolError,
    ThresholdError,
)
from secure_fl.he.aggregate import (
    _RANGE_SLACK,
    _TENSEAL_ERRORS,
    FloatVector,
    _check_layout,
    _check_round,
)
from secure_fl.he.context import PublicContext, SecretContext, check_fingerprint, tenseal
from secure_fl.he.packing import DEFAULT_CHUNK_CIPHERTEXTS, Layout
from secure_fl.he.wire import KIND_SUM, decode_frame

if TYPE_CHECKING:
    from secure_fl.he.parallel import EncryptionPool


class SumDecryptor:
    """A site's view of the result: decrypts a summed chunk frame, at the site, for the site.

    Guarantee and rule: the values it returns must never leave the site (the server holding a
    ciphertext and its raw decryption could solve for the secret key). Over the network the site
    decrypts only the encrypted global model, and no protocol message carries decrypted values.

    Errors: ConfigError if ``secret`` is not a SecretContext, the layout does not match, or the
    fingerprint is not ``expected_fingerprint``.
    """

    def __init__(
        self,
        secret: SecretContext,
        layout: Layout,
        *,
        round_id: int,
        expected_fingerprint: str | None = None,
    ) -> None:
        if not isinstance(secret, SecretContext):
            raise ConfigError(f"decryption needs a SecretContext, got {type(secret).__name__}")
        check_fingerprint(secret.fingerprint, expected_fingerprint, "the site's secret context")
        _check_layout(layout, secret.preset.slots)
        self._secret = secret
        self._ts = tenseal()
        self.layout = layout
        self.round_id = _check_round(round_id)

    def __repr__(self) -> str:
        return f"SumDecryptor({self._secret!r}, round={self.round_id})"

    def __reduce__(self) -> Any:
        raise TypeError("SumDecryptor holds the CKKS secret key and cannot be pickled")

    def decrypt(self, frame: bytes, *, chunk: int, contributors: int | None = None) -> FloatVector:
        """Decrypt the sum frame of ``chunk``: the weighted sum ``sum_i factor_i * x_i`` there.

        Errors: RemoteProtocolError when the frame is corrupted, truncated, not a sum, of another
        federation, round or chunk, has the wrong sizes or (if given) not ``contributors`` sites;
        DecryptionError when a ciphertext does not parse or decrypts to values beyond the bound
        (a corrupted ciphertext, or one encrypted under another key).
        """
        parsed = decode_frame(frame)
        where = f"sum of chunk {chunk}"
        if parsed.kind != KIND_SUM:
            raise RemoteProtocolError(f"{where}: not a sum frame")
        if parsed.fingerprint != self._secret.fingerprint:
            raise RemoteProtocolError(
                f"{where}: made under context {parsed.fingerprint[:16]}..., not this site's "
                f"{self._secret.fingerprint[:16]}... (mixed keys or parameters)"
            )
        if parsed.round_id != self.round_id or parsed.chunk != chunk:
            raise RemoteProtocolError(
                f"{where}: frame of round {parsed.round_id}, chunk {parsed.chunk}; expected round "
                f"{self.round_id}, chunk {chunk}"
            )
        if contributors is not None and parsed.contributors != contributors:
            raise RemoteProtocolError(
                f"{where}: sums {parsed.contributors} sites, expected {contributors}"
            )
        pieces = self.layout.pieces(chunk)
        start, stop = self.layout.chunk_range(chunk)
        if parsed.values != stop - start or len(parsed.blobs) != len(pieces):
            raise RemoteProtocolError(f"{where}: wrong number of values or ciphertexts")
        out = np.empty(stop - start, dtype=np.float64)
        offset = 0
        ctx = self._secret.tenseal_context
        for i, (blob, expected) in enumerate(zip(parsed.blobs, pieces, strict=True)):
            try:
                vec = self._ts.ckks_vector_from(ctx, blob)
                values = np.asarray(vec.decrypt(), dtype=np.float64)
            except _TENSEAL_ERRORS as exc:
                raise DecryptionError(
                    f"{where}, ciphertext {i}: does not decrypt under this site's key "
                    f"(corrupted or foreign ciphertext): {exc}"
                ) from None
            if values.shape != (expected,):
                raise DecryptionError(f"{where}, ciphertext {i}: wrong number of values")
            out[offset : offset + expected] = values
            offset += expected
        bound = self._secret.preset.max_abs * (1 + _RANGE_SLACK)
        peak = float(np.max(np.abs(out))) if out.size else 0.0
        if not math.isfinite(peak) or peak > bound:
            raise DecryptionError(
                f"{where}: decrypts to magnitudes up to {peak:.3g}, beyond the bound "
                f"{self._secret.preset.max_abs:g} that no honest sum can exceed: a ciphertext is "
                "corrupted or was encrypted under another key"
            )
        return out


@dataclass(frozen=True)
class RoundStats:
    """Costs and accuracy of one :func:`encrypted_mean` round.

    ``bytes_sent`` and ``site_seconds`` cover the sites that sent (encryption and serialisation);
    ``server_seconds`` covers checking, adding and serialising the sums; ``decrypt_seconds`` the
    site-side decryption; ``server_bytes_sent`` the size of the sum frames (sent to each site that
    decrypts). ``max_error`` is the largest absolute difference between the decrypted mean and the
    float64 plaintext weighted mean, ``max_rel_error`` that divided by the plaintext mean's largest
    magnitude (absolute when the mean is zero); both are NaN when no reference was computed.
    """

    bytes_sent: dict[str, int]
    site_seconds: dict[str, float]
    server_seconds: float
    decrypt_seconds: float
    server_bytes_sent: int
    ciphertexts: int
    chunks: int
    peak_pending_chunks: int
    max_error: float
    max_rel_error: float
    mean_abs_peak: float = field(default=float("nan"))

    @classmethod
    def empty(cls, sites: Sequence[str], *, reference: bool) -> RoundStats:
        """The costs of a round over an empty vector: nothing sent, encrypted or decrypted;
        the errors are 0 with ``reference`` (the empty mean is exact), else NaN."""
        error = 0.0 if reference else float("nan")
        return cls(
            bytes_sent=dict.fromkeys(sites, 0),
            site_seconds=dict.fromkeys(sites, 0.0),
            server_seconds=0.0,
            decrypt_seconds=0.0,
            server_bytes_sent=0,
            ciphertexts=0,
            chunks=0,
            peak_pending_chunks=0,
            max_error=error,
            max_rel_error=error,
        )


def require_two_contributors(count: int) -> None:
    """The one rule of every CKKS mean: at least two contributing sites.

    Errors: ThresholdError for ``count`` < 2 (the decrypted mean of one site is that site's
    update, which every other site would learn; the network path refuses the same)."""
    if count < 2:
        raise ThresholdError(
            f"CKKS aggregation needs at least 2 contributing sites, got {count}: the decrypted "
            "mean of one site is that site's update, which every other site would learn"
        )


def encrypted_mean(
    secret: SecretContext,
    public: PublicContext,
    vectors: Mapping[str, npt.NDArray[Any]],
    weights: Mapping[str, float],
    included: Sequence[str],
    *,
    round_id: int = 0,
    chunk_ciphertexts: int = DEFAULT_CHUNK_CIPHERTEXTS,
    reference: bool = True,
    pool: EncryptionPool | None = None,
) -> tuple[FloatVector, RoundStats]:
    """Weighted mean of ``vectors[s]`` over ``included``, computed under CKKS, chunk-major.

    ``weights`` names every site of the round (dropped ones too): each included site scales by
    ``weight / total_weight`` before encrypting, and the mean is the decrypted sum divided by the
    included sites' share of the total weight. The sites play :class:`SiteEncryptor` and
    :class:`SumDecryptor` with ``secret``; the server plays :class:`CiphertextSummer` with
    ``public`` and never sees ``secret``. With ``reference`` the float64 plaintext mean is
    computed alongside, chunk by chunk, to measure the error. With ``pool`` the sites' chunks are
    encrypted in its worker processes (at most ``2 * workers`` chunks in flight) while this process
    adds and decrypts.

    Fewer than two included sites are refused (ThresholdError): the decrypted mean of one site is
    that site's update, which every other site would learn (the network path refuses the same).

    Errors: ThresholdError for fewer than two included sites; ConfigError for mismatched
    contexts, sites without a weight or a vector, or vectors of different lengths;
    InvalidUpdateError for an update beyond the preset's
    bound or non-finite (checked for every included site before anything is encrypted); the
    errors of the three roles.
    """
    if not isinstance(secret, SecretContext):
        raise ConfigError(f"secret must be a SecretContext, got {type(secret).__name__}")
    if isinstance(public, SecretContext) or not isinstance(public, PublicContext):
        raise ConfigError(
            "the server must be given a PublicContext (never the secret context: a server "
            "holding the secret key could read every site's update)"
        )
    check_fingerprint(public.fingerprint, secret.fingerprint, "the server's public context")
    if pool is not None:
        check_fingerprint(pool.fingerprint, secret.fingerprint, "the encryption pool")
    if len(set(included)) != len(included):
        raise ConfigError("included names a site twice")
    require_two_contributors(len(included))
    missing = sorted(s for s in included if s not in vectors or s not in weights)
    if missing:
        raise ConfigError(f"included sites without a vector or a weight: {missing}")
    total = math.fsum(float(w) for w in weights.values())
    if not math.isfinite(total) or total <= 0 or any(not float(w) > 0 for w in weights.values()):
        raise ConfigError("weights must be positive and finite")
    sizes = {int(np.shape(vectors[s])[0]) for s in included}
    if len(sizes) != 1:
        raise ConfigError(f"the included vectors have different lengths {sorted(sizes)}")
    # The one CKKS round recipe (it also returns the empty mean of an empty vector).
    from secure_fl.rounds.ckks_local import run_ckks_local

    mean, stats, _ = run_ckks_local(
        secret,
        public,
        {s: vectors[s] for s in included},
        weights,
        included,
        round_id=round_id,
        chunk_ciphertexts=chunk_ciphertexts,
        reference=reference,
        pool=pool,
    )
    return mean, stats
