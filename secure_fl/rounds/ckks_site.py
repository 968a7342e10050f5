"""The site half of the CKKS round (:mod:`secure_fl.rounds.ckks` describes the recipe).

:class:`CkksSiteRound` holds the federation's secret context: it checks a setup before anything is
sent, encrypts its weight-scaled vector freshly (whole: :meth:`~CkksSiteRound.upload`, or frame
by frame: :meth:`~CkksSiteRound.frames`, as :class:`CkksFrame` messages) and decrypts the
encrypted sum for itself, failing closed on any check after the first decryption.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from secure_fl.crypto import RandomBytes
from secure_fl.encoding import l2_clip
from secure_fl.errors import (
    ConfigError,
    InvalidUpdateError,
    LocalProtocolError,
    PolicyError,
    PostDecryptionError,
    RemoteProtocolError,
)
from secure_fl.he.aggregate import SiteEncryptor
from secure_fl.he.context import SecretContext, check_fingerprint
from secure_fl.he.decrypt import SumDecryptor
from secure_fl.he.model import (
    MAX_CHUNK_CIPHERTEXTS,
    pack_frames,
)
from secure_fl.he.packing import Layout
from secure_fl.he.site import check_base, check_local_model, clip_local_model, decrypt_model
from secure_fl.rounds.base import SiteRound
from secure_fl.rounds.checks import own_weight
from secure_fl.rounds.messages import CkksResult, CkksSetup, CkksUpload, Message
from secure_fl.rounds.policy import SitePolicy

FloatVector = npt.NDArray[np.float64]
log = logging.getLogger("secure_fl.rounds.ckks")


@dataclass(frozen=True)
class CkksFrame:
    """Site -> server (CKKS): one frame of the site's upload (chunk ``chunk``, in order);
    ``last`` marks the site's final frame (its upload is then complete)."""

    round_id: int
    sender: int
    chunk: int
    frame: bytes = field(repr=False)
    last: bool = False

    def wire_size(self) -> int:
        return 17 + len(self.frame)


def _fingerprint_raw(fingerprint: str) -> bytes:
    return bytes.fromhex(fingerprint)


class CkksSiteRound(SiteRound):
    """The site half of one CKKS round; holds the federation's secret context.

    ``secret`` the site's :class:`SecretContext` (its fingerprint must be ``expected_fingerprint``
    when given); ``name`` the site's name in error messages; ``fail_closed`` (default True):
    the setup never refuses on the site's own values (whether they fit the preset depends on
    the site's secret update and a base the server chose: a refusal would be a one-bit oracle),
    it refuses only a base the server sent beyond the bound
    (:func:`~secure_fl.he.site.check_base`) and clips the new local model into the preset's
    range (:func:`~secure_fl.he.site.clip_local_model`; the count in :attr:`clipped`, logged at
    WARNING on this site, never sent); the in-process simulation, where one process holds
    everything, passes False and gets InvalidUpdateError with the peak instead. ``pool`` an optional
    :class:`~secure_fl.he.parallel.EncryptionPool` of the same context. ``stream`` (default
    False): :meth:`on_setup` returns the whole :class:`CkksUpload` (what a generic driver such
    as :func:`secure_fl.rounds.local.run_local` or the gRPC site sends); with True it returns
    None and the driver pulls :meth:`frames` one by one (chunk-major, bounded memory). The object
    cannot be pickled or exported (it holds the secret key and the site's plaintext vector).

    Errors: ConfigError for a context that is not a SecretContext or of another fingerprint.
    """

    def __init__(
        self,
        site_id: int,
        *,
        secret: SecretContext,
        policy: SitePolicy | None = None,
        expected_fingerprint: str | None = None,
        name: str | None = None,
        fail_closed: bool = True,
        pool: Any = None,
        stream: bool = False,
        randbytes: RandomBytes = os.urandom,
    ) -> None:
        super().__init__(site_id, policy=policy or SitePolicy(), randbytes=randbytes)
        if not isinstance(secret, SecretContext):
            raise ConfigError(f"a CKKS site needs a SecretContext, got {type(secret).__name__}")
        check_fingerprint(secret.fingerprint, expected_fingerprint, "the site's secret context")
        self._secret = secret
        self.name = name
        self.fail_closed = bool(fail_closed)
        self._pool = pool
        self.stream = bool(stream)
        self.setup: CkksSetup | None = None
        self.weight: float | None = None
        self.layout: Layout | None = None
        #: Values of the new local model clipped into the preset's range (``fail_closed``).
        self.clipped = 0
        #: Whether the update was clipped in L2 (``setup.l2_clip``).
        self.l2_clipped = False
        self._vector: FloatVector | None = None
        self._encryptor: SiteEncryptor | None = None
        self._frames: Iterator[bytes] | None = None
        self._sent = 0
        self.model: dict[str, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"CkksSiteRound(site={self.site_id}, {self._secret!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("CkksSiteRound holds the CKKS secret key and cannot be pickled")

    def export_state(self, sealer: Any) -> NoReturn:
        """Not supported: the state is the secret context and the plaintext vector; a host keeps
        the object in memory for the one upload it lasts. Errors: LocalProtocolError."""
        raise LocalProtocolError(
            "a CKKS site half holds the secret context and its plaintext vector and is not "
            "exported; keep it in the host process for the upload (one message)"
        )

    def check_vector(self, vector: npt.NDArray[Any]) -> None:
        """The vector this site will encrypt must be finite and within the preset's ``max_abs``.

        Call it BEFORE reporting the weight (the gRPC site does, right after its task): a refusal
        after the report would tell the server one bit about secret values.
        Errors: PostDecryptionError (``fail_closed``, no value in the message) or
        InvalidUpdateError (the peak and the bound) when it is not."""
        if not isinstance(vector, np.ndarray) or vector.ndim != 1:
            raise InvalidUpdateError("the vector must be a flat (1-D) numpy array")
        if self.fail_closed:
            check_local_model(self._secret, np.asarray(vector, dtype=np.float64))
            return
        if vector.size:
            layout = Layout(int(vector.shape[0]), self._secret.preset.slots)
            SiteEncryptor(self._secret, layout).check_update(vector, site=self.name)

    def on_setup(
        self,
        setup: Message,
        *,
        update: np.ndarray,
        reported_weight: float,
        base: np.ndarray | None = None,
    ) -> Message | None:
        """Check ``setup`` against this site's context, policy and reported weight, then prepare
        the vector ``clip(l2_clip(update) (+ base))`` (``base``: the global model, when the round
        carries the new local model) and return the :class:`CkksUpload` (a fresh encryption of
        ``weight * vector``), or, with ``stream``, None: the caller then pulls :meth:`frames`.

        Checks, all before anything is encrypted or sent: the aggregation is one the policy
        accepts and the policy does not require distributed DP (``require_dp``, or implied by
        ``min_noise_multiplier`` / ``max_dp_rounds``: CKKS adds no noise); the fingerprint is
        this site's context's (PolicyError); the ring degree and scale are its preset's;
        ``chunk_ciphertexts`` in [1, 4096]; the vector length is the update's and the policy's ``vector_length`` (PolicyError); the weight: with the
        participants' weights listed, this site's listed weight is the one it reported and the
        announced weight is its exact share (PolicyError), else it is in (0, 1].

        With ``fail_closed`` (the default) every refusal depends on the setup and the base (what
        the server sent: a base beyond the preset's bound is a PolicyError) and never on the
        site's update: its non-finite values are zeroed and the new local model is clipped into
        the preset's range (:attr:`clipped`, a WARNING in this site's log only).

        Errors: PolicyError / RemoteProtocolError as above; InvalidUpdateError for a malformed
        update; without ``fail_closed`` InvalidUpdateError for a vector beyond the bound (see
        :meth:`check_vector`); LocalProtocolError for a second setup."""
        if self.setup is not None:
            raise LocalProtocolError("this CKKS site half already accepted a setup")
        if not isinstance(setup, CkksSetup):
            raise RemoteProtocolError(f"expected a CkksSetup, got {type(setup).__name__}")
        if not self.policy.accepts("ckks"):
            raise PolicyError("this site's policy does not accept the aggregation 'ckks'")
        # A CKKS round carries no distributed DP noise: refused when the policy requires DP.
        from secure_fl.transport.policy import check_privacy_floor

        check_privacy_floor(self.policy, "ckks")
        secret, preset = self._secret, self._secret.preset
        if setup.context_sha256 != _fingerprint_raw(secret.fingerprint):
            raise PolicyError(
                f"CkksSetup: the CKKS context {setup.context_sha256.hex()[:16]}... is not the "
                f"federation's {secret.fingerprint[:16]}..."
            )
        if setup.poly_modulus_degree != preset.poly_modulus_degree or setup.scale != preset.scale:
            raise RemoteProtocolError("CkksSetup: the parameters are not the federation's")
        chunk = setup.chunk_ciphertexts
        if isinstance(chunk, bool) or not isinstance(chunk, int):
            raise RemoteProtocolError("CkksSetup: chunk_ciphertexts is not an integer")
        if not 1 <= chunk <= MAX_CHUNK_CIPHERTEXTS:
            raise RemoteProtocolError(
                f"CkksSetup: chunk_ciphertexts {chunk} is not in [1, {MAX_CHUNK_CIPHERTEXTS}]"
            )
        if not isinstance(update, np.ndarray) or update.ndim != 1:
            raise InvalidUpdateError("the update must be a flat (1-D) numpy array")
        size = int(update.shape[0])
        pinned = self.policy.vector_length
        if setup.vector_length != size or (pinned is not None and pinned != size) or size < 1:
            raise PolicyError(
                f"CkksSetup: vector length {setup.vector_length} is not this site's {size}"
                + (f" (policy.vector_length {pinned})" if pinned is not None else "")
            )
        if setup.weights:
            weight = own_weight(setup.weights, self.site_id, reported_weight, setup.weight)
        else:
            weight = float(setup.weight)
            if not (math.isfinite(weight) and 0 < weight <= 1):
                raise RemoteProtocolError(f"CkksSetup: weight {setup.weight!r} is not in (0, 1]")
        if base is not None:
            if np.shape(base) != (size,):
                raise InvalidUpdateError("base must be a flat vector of the update's length")
            base = np.asarray(base, dtype=np.float64)
            if self.fail_closed:
                check_base(secret, base)  # PolicyError, on the server's values alone
        vector = np.asarray(update, dtype=np.float64)
        clipped = 0
        finite = np.isfinite(vector)
        if self.fail_closed and not finite.all():  # never refused: zeroed (logged below)
            clipped = int(vector.size - np.count_nonzero(finite))
            vector = np.where(finite, vector, 0.0)
        if setup.l2_clip is not None:
            vector, info = l2_clip(vector, setup.l2_clip)
            self.l2_clipped = bool(info.clipped)
        if self.fail_closed:
            vector, more = clip_local_model(secret, vector, base)
            self.clipped = clipped + more
            if self.clipped:
                log.warning(
                    "CKKS site %s: %d value(s) of the new local model were non-finite or beyond "
                    "the preset's bound %g and were clipped (logged here only, never sent)",
                    self.name or self.site_id,
                    self.clipped,
                    preset.max_abs,
                )
        else:
            if base is not None:
                vector = base + vector
            self.check_vector(vector)
        self.setup, self.weight, self._vector = setup, weight, vector
        self.layout = Layout(size, preset.slots, chunk)
        self._encryptor = SiteEncryptor(secret, self.layout)
        return None if self.stream else self.upload()

    def _stream(self) -> Iterator[bytes]:
        if self._encryptor is None or self._vector is None or self.setup is None:
            raise LocalProtocolError("no setup was accepted (call on_setup first)")
        if self._frames is not None:
            raise LocalProtocolError("this site's upload was already produced")
        vector, self._vector = self._vector, None  # the plaintext is not kept past encryption
        try:
            self._frames = self._encryptor.stream(
                vector,
                factor=float(self.weight or 0.0),
                round_id=self.setup.round_id,
                site=self.name,
                pool=self._pool,
            )
            yield from self._frames
        except InvalidUpdateError:
            if self.fail_closed:
                raise PostDecryptionError(
                    "this site's vector failed the CKKS range check (the value is not logged)"
                ) from None
            raise

    def upload(self) -> CkksUpload:
        """The whole upload: a fresh encryption of ``weight * vector`` as one
        ``CKKS_CIPHERTEXT`` payload. Errors: LocalProtocolError without a setup or twice;
        CryptoError if TenSEAL fails."""
        payload = pack_frames(self._stream())
        if self.setup is None:  # pragma: no cover - _stream raised already
            raise LocalProtocolError("no setup")
        self._sent = self.layout.chunks if self.layout else 0
        return CkksUpload(round_id=self.setup.round_id, sender=self.site_id, payload=payload)

    def frames(self) -> Iterator[CkksFrame]:
        """The upload frame by frame, each encrypted when it is asked for (chunk-major drivers
        hold one frame per site). Errors: as :meth:`upload`."""
        setup, layout = self.setup, self.layout
        if setup is None or layout is None:
            raise LocalProtocolError("no setup was accepted (call on_setup first)")
        for chunk, frame in enumerate(self._stream()):
            self._sent = chunk + 1
            yield CkksFrame(
                round_id=setup.round_id,
                sender=self.site_id,
                chunk=chunk,
                frame=frame,
                last=chunk == layout.chunks - 1,
            )

    def handle(self, message: Message) -> Message | None:
        """A :class:`CkksResult`: decrypt the encrypted sum **for this site** (kept in
        :attr:`model`; it never leaves the site). Anything else is refused.

        Errors: RemoteProtocolError for another message, round or a payload failing a check
        before decryption (only the round is refused); PostDecryptionError from the first
        decryption on (fail closed: stop for good)."""
        if not isinstance(message, CkksResult):
            raise RemoteProtocolError(
                f"refused-unknown-instruction: {type(message).__name__} in a CKKS round"
            )
        setup = self.setup
        expected_round = setup.round_id if setup is not None else None
        self.model = decrypt_model(
            self._secret,
            message.payload,
            expected_round=expected_round,
            expected_size=setup.vector_length if setup is not None else None,
        )
        return None

    def decrypt_chunk(
        self, frame: bytes, *, chunk: int, contributors: int, share: float
    ) -> FloatVector:
        """Decrypt one sum frame (chunk-major in-process driving) and divide by ``share``; the
        values stay at this site. Errors: RemoteProtocolError for a frame of another round,
        chunk or context or with other contributors; PostDecryptionError (``fail_closed``) or
        DecryptionError for a failure from the decryption on."""
        if self.setup is None or self.layout is None:
            raise LocalProtocolError("no setup was accepted (call on_setup first)")
        if not (math.isfinite(share) and 0 < share <= 1 + 1e-9):
            raise RemoteProtocolError(f"the share {share!r} is not in (0, 1]")
        decryptor = SumDecryptor(self._secret, self.layout, round_id=self.setup.round_id)
        try:
            values = decryptor.decrypt(frame, chunk=chunk, contributors=contributors)
        except RemoteProtocolError:
            raise
        except Exception as exc:
            if not self.fail_closed:
                raise
            raise PostDecryptionError(
                f"chunk {chunk} failed the check after decryption ({type(exc).__name__})"
            ) from None
        values /= share
        return values

    @property
    def done(self) -> bool:
        return self.layout is not None and self._sent == self.layout.chunks


__all__ = ["CkksFrame", "CkksSiteRound"]
