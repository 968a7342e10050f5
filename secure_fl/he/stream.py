"""The server's streaming CKKS sum: uploads are added frame by frame as they arrive.

:class:`StreamingSum` holds the running sum of one round (one encrypted model: a
:class:`~secure_fl.he.aggregate.CiphertextSummer` with one sum per chunk) and, per upload still
streaming, at most the bytes of one frame that has not fully arrived. It never buffers a whole
upload, so the server's memory is ``O(one model of ciphertexts + one frame per open upload)``
whatever the number of sites (``protocols/ckks.md``, "Streaming").

**Why a bad frame cannot poison the sum.** Every frame is checked completely *before* any of its
ciphertexts is added (digest, kind, fingerprint, round, chunk, sizes; every ciphertext parses under
the public parameters, has two components, the federation's scale and level, and is not
transparent: :meth:`CiphertextSummer.add`), and each site's frames must arrive in chunk order. A
frame that fails is never added. Keeping each site's frames aside until its upload completed
(the other possible design) would hold one whole upload per open stream, which is what this class
exists to avoid: every site receives its setup at the same moment, so all uploads stream at once.

**Uploads that stop half-way.** What a site's earlier frames added cannot be taken out again
without their ciphertexts (which are not kept). An upload that fails after at least one of its
frames was added (a bad later frame, a stream cut, a payload trailer that does not match, or the
stage closing while it streams) therefore *taints* the sum: :class:`TaintedSumError` names the
site, and the round must be run again without it (a fresh round id; the server's coordinator
retries attempts). An upload refused at its first frame adds nothing and only drops that site.
An honest upload is one message of a few seconds, so a cut in the middle is rare; a site that
cuts its uploads on purpose costs the federation one attempt and is named.

The errors: RemoteProtocolError (this upload is refused, nothing of it was added, the round goes
on); TaintedSumError (a ProtocolError, not remote: the round cannot produce a sound sum);
ThresholdError (fewer complete uploads than required at the end).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from secure_fl.errors import ConfigError, ProtocolError, RemoteProtocolError, ThresholdError
from secure_fl.he.aggregate import CiphertextSummer
from secure_fl.he.context import PublicContext
from secure_fl.he.model import LENGTH, max_frame_bytes
from secure_fl.he.packing import Layout
from secure_fl.he.wire import peek_chunk


class TaintedSumError(ProtocolError):
    """Frames of an upload that did not complete were already added: the sum is unusable.

    ``sites`` names the sites whose incomplete uploads are in the sum; run the round again without
    them (nothing about any site's values is revealed by this error)."""

    def __init__(self, message: str, sites: Iterable[str]) -> None:
        super().__init__(message)
        self.sites: frozenset[str] = frozenset(sites)


@dataclass
class _Upload:
    buffer: bytearray = field(default_factory=bytearray)
    folded: int = 0


class StreamingSum:
    """The server's running sum of one CKKS round, fed frame by frame (public context only).

    ``sites`` are the sites asked to upload (their names as they appear in errors); each may
    upload once. Not thread-safe: the caller serialises calls (the gRPC server holds its lock).

    Errors: ConfigError for a secret context, a layout of another preset, a bad round id or an
    empty site list (see :class:`CiphertextSummer`).
    """

    def __init__(
        self, public: PublicContext, layout: Layout, *, round_id: int, sites: Iterable[str]
    ) -> None:
        self._summer = CiphertextSummer(
            public, layout, round_id=round_id, expected_fingerprint=public.fingerprint
        )
        self.layout = layout
        self.round_id = round_id
        self._expected = frozenset(sites)
        if not self._expected or any(not isinstance(s, str) or not s for s in self._expected):
            raise ConfigError("sites must name at least one site, each a non-empty string")
        preset = public.preset
        self._max_frame = max_frame_bytes(
            layout, preset.poly_modulus_degree, len(preset.coeff_mod_bit_sizes) - 1
        )
        self._open: dict[str, _Upload] = {}
        self._complete: list[str] = []
        self._tainted: dict[str, str] = {}
        self._taken: set[int] = set()
        self._closed = False
        #: Largest number of bytes held at once in the partial-frame buffers of open uploads.
        self.peak_buffered = 0

    def __repr__(self) -> str:
        return (
            f"StreamingSum(round={self.round_id}, complete={len(self._complete)}, "
            f"open={len(self._open)}, chunks={self.layout.chunks})"
        )

    @property
    def complete(self) -> tuple[str, ...]:
        """Sites whose upload is complete (every frame added), in completion order."""
        return tuple(self._complete)

    @property
    def open_uploads(self) -> tuple[str, ...]:
        """Sites whose upload has begun and not ended."""
        return tuple(sorted(self._open))

    @property
    def tainted(self) -> frozenset[str]:
        """Sites whose incomplete upload has frames in the sum (the sum is then unusable)."""
        return frozenset(self._tainted)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no upload is accepted any more)."""
        return self._closed

    @property
    def peak_pending_chunks(self) -> int:
        """Largest number of chunk sums held at once (1 when driven chunk-major with :meth:`take`)."""
        return self._summer.peak_pending

    def buffered(self) -> int:
        """Bytes held now in the partial-frame buffers of the open uploads."""
        return sum(len(u.buffer) for u in self._open.values())

    def open(self, site: str) -> None:
        """Begin ``site``'s upload.

        Errors: RemoteProtocolError when the stage is closed, the site was not asked to upload,
        its upload is already open, complete or tainted."""
        if self._closed:
            raise RemoteProtocolError(f"site {site!r}: the upload stage is closed")
        if site not in self._expected:
            raise RemoteProtocolError(f"site {site!r} is not expected to upload in this round")
        if site in self._open or site in self._complete or site in self._tainted:
            raise RemoteProtocolError(f"site {site!r}: its upload was already received or begun")
        self._open[site] = _Upload()

    def feed(self, site: str, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of ``site``'s ``CKKS_CIPHERTEXT`` payload (any split); every frame
        they complete is checked and added at once, so at most one partial frame is buffered.

        Errors: RemoteProtocolError (the upload is refused, nothing of it was added) when the
        upload is not open, a frame length is zero or beyond an honest frame's size, or the first
        frame fails a check; TaintedSumError when a later frame fails (earlier frames were added).
        """
        upload = self._upload(site)
        upload.buffer += data
        buf = upload.buffer
        while len(buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buf, 0)
            if length == 0 or length > self._max_frame:
                self._fail(site, f"a frame length of {length} bytes (at most {self._max_frame})")
            end = LENGTH.size + length
            if len(buf) < end:
                break
            frame = bytes(buf[LENGTH.size : end])
            del buf[:end]
            self._fold(site, upload, frame)
        self.peak_buffered = max(self.peak_buffered, self.buffered())

    def add_frame(self, site: str, frame: bytes) -> None:
        """Check one whole frame of ``site``'s upload and add it (the frame-by-frame form of
        :meth:`feed`, for a transport that carries frames as messages).

        Errors: as :meth:`feed`."""
        upload = self._upload(site)
        if upload.buffer:
            self._fail(site, "a whole frame arrived while a partial one was buffered")
        self._fold(site, upload, frame)

    def finish(self, site: str) -> None:
        """End ``site``'s upload: it must hold every chunk and no trailing bytes.

        Errors: RemoteProtocolError when nothing was added; TaintedSumError when frames were
        added but the upload is short or has trailing bytes."""
        upload = self._upload(site)
        if upload.folded != self.layout.chunks or upload.buffer:
            self._fail(
                site,
                f"the upload ended after {upload.folded} of {self.layout.chunks} frames"
                + (f" with {len(upload.buffer)} trailing bytes" if upload.buffer else ""),
            )
        del self._open[site]
        self._complete.append(site)

    def abort(self, site: str, reason: str) -> None:
        """``site``'s upload failed in transport (stream cut, payload checksum mismatch).

        Nothing happens to the sum if none of its frames was added; otherwise the site is
        recorded as tainted (see :attr:`tainted`; :meth:`sum_frames` then raises). Never raises
        for an upload that is not open."""
        upload = self._open.pop(site, None)
        if upload is not None and upload.folded:
            self._tainted[site] = reason

    def close(self) -> None:
        """Close the upload stage: uploads that have not completed are dropped (tainted if any of
        their frames was added). Idempotent."""
        for site in list(self._open):
            self.abort(site, "still streaming when the upload stage closed")
        self._closed = True

    def take(self, chunk: int, *, contributors: Iterable[str]) -> bytes:
        """Chunk-major driving (the in-process round): the sum frame of ``chunk``, which must hold
        exactly the frames of ``contributors``; the running sum of that chunk is then freed and
        any later frame for it is refused.

        Errors: TaintedSumError if the sum is tainted; RemoteProtocolError when the contributors
        differ or the chunk was taken already."""
        self._check_untainted()
        if chunk in self._taken:
            raise RemoteProtocolError(f"chunk {chunk} was already taken")
        frame = self._summer.pop(chunk, expected=sorted(contributors))
        self._taken.add(chunk)
        return frame

    def sum_frames(self, *, min_contributors: int = 2) -> Iterator[bytes]:
        """After :meth:`close`: the sum frames of the complete uploads, chunk by chunk, each
        chunk's running sum freed as its frame is produced.

        Errors: ConfigError before :meth:`close`; TaintedSumError when an incomplete upload has
        frames in the sum; ThresholdError for fewer than ``min_contributors`` complete uploads
        (a sum of one site would show that site's vector to every site that decrypts it)."""
        if not self._closed:
            raise ConfigError("sum_frames() needs the upload stage closed (call close() first)")
        self._check_untainted()
        if len(self._complete) < max(1, min_contributors):
            raise ThresholdError(
                f"{len(self._complete)} complete CKKS upload(s), at least {min_contributors} "
                "required (a sum of one site reveals that site's vector to every decrypting site)"
            )
        expected = sorted(self._complete)
        for chunk in range(self.layout.chunks):
            if chunk not in self._taken:
                yield self._summer.pop(chunk, expected=expected)

    # -- internals -------------------------------------------------------------------------

    def _upload(self, site: str) -> _Upload:
        self._check_untainted()
        upload = self._open.get(site)
        if upload is None:
            raise RemoteProtocolError(f"site {site!r}: no upload of this site is open")
        return upload

    def _fold(self, site: str, upload: _Upload, frame: bytes) -> None:
        chunk = upload.folded
        if chunk >= self.layout.chunks:
            self._fail(site, f"more than the {self.layout.chunks} frames of the layout")
        if chunk in self._taken:
            self._fail(site, f"chunk {chunk} arrived after its sum was taken")
        if peek_chunk(frame) != chunk:
            self._fail(site, f"frame {chunk} of the upload is not the frame of chunk {chunk}")
        try:
            self._summer.add(site, frame)  # checks the whole frame before adding any of it
        except RemoteProtocolError as exc:
            self._fail(site, str(exc))
        upload.folded += 1

    def _fail(self, site: str, reason: str) -> None:
        upload = self._open.pop(site, None)
        if upload is not None and upload.folded:
            self._tainted[site] = reason
            raise TaintedSumError(
                f"site {site!r}: its upload failed after {upload.folded} frame(s) were added "
                f"({reason}); the round must be run again without this site",
                [site],
            )
        raise RemoteProtocolError(f"site {site!r}: upload refused, nothing added: {reason}")

    def _check_untainted(self) -> None:
        if self._tainted:
            sites = sorted(self._tainted)
            raise TaintedSumError(
                f"the CKKS sum holds part of the incomplete upload(s) of {sites}: run the round "
                "again without them",
                sites,
            )
