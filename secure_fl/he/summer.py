"""The server's CKKS role (:mod:`secure_fl.he.aggregate`): :class:`CiphertextSummer` checks every
site frame and adds the sites' ciphertexts chunk by chunk, holding only the public context.

Errors: ConfigError for a secret context, a mismatched layout or fingerprint; RemoteProtocolError
for a frame that is corrupted, truncated, of another federation, round or chunk, or whose
ciphertexts do not parse or have the wrong size, scale or level; CryptoError if TenSEAL fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from secure_fl.errors import ConfigError, CryptoError, RemoteProtocolError
from secure_fl.he.backend import _TENSEAL_ERRORS, _check_layout, _check_round, _loader
from secure_fl.he.context import PublicContext, SecretContext, check_fingerprint, tenseal
from secure_fl.he.packing import Layout
from secure_fl.he.wire import KIND_SITE, KIND_SUM, decode_frame, encode_frame


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
