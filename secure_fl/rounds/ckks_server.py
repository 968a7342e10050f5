"""The server half of the CKKS round (:mod:`secure_fl.rounds.ckks` describes the recipe).

:class:`CkksServerRound` holds only the public context; uploads are checked and added as they
stream in (:class:`~secure_fl.he.stream.StreamingSum`), and its outcome is the encrypted weighted
sum over the complete uploads (a ``CKKS_MODEL`` payload).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from secure_fl.errors import (
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
    ThresholdError,
)
from secure_fl.he.context import PublicContext, SecretContext
from secure_fl.he.model import (
    EncryptedModel,
    Structure,
    encode_model,
)
from secure_fl.he.packing import Layout
from secure_fl.he.stream import StreamingSum, TaintedSumError
from secure_fl.rounds.base import RoundOutcome, ServerRound
from secure_fl.rounds.ckks_site import CkksFrame, _fingerprint_raw
from secure_fl.rounds.messages import CkksResult, CkksSetup, CkksUpload, Message
from secure_fl.rounds.plan import RoundPlan


class CkksServerRound(ServerRound):
    """The server half of one CKKS round; holds only ``public``.

    ``structure`` (the model's tensors, for the ``CKKS_MODEL`` header; default one float64 tensor
    named ``vector``), ``names`` (site id -> name used in errors and the summer), ``min_sites``
    (complete uploads required, at least 2: a sum of one site would show its vector to every
    site that decrypts it) and ``phase_deadline_s`` (announced in the setup).

    Errors: ConfigError when the plan is not a CKKS plan, ``public`` is not a PublicContext (a
    secret context is refused), its preset differs from ``plan.spec.preset`` or the structure
    does not hold ``plan.vector_length`` values.
    """

    def __init__(
        self,
        plan: RoundPlan,
        public: PublicContext,
        *,
        structure: Structure | None = None,
        names: Mapping[int, str] | None = None,
        min_sites: int = 2,
        phase_deadline_s: float = 0.0,
    ) -> None:
        super().__init__(plan)
        if plan.spec.protocol != "ckks":
            raise ConfigError(f"CkksServerRound needs a ckks plan, got {plan.spec.protocol!r}")
        if isinstance(public, SecretContext) or not isinstance(public, PublicContext):
            raise ConfigError(
                "the server must be given a PublicContext (never the secret context: a server "
                "holding the secret key could read every site's vector)"
            )
        if plan.spec.preset is not None and plan.spec.preset != public.preset.name:
            raise ConfigError(
                f"aggregation.preset {plan.spec.preset!r} differs from the public context's "
                f"preset {public.preset.name!r}"
            )
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 2:
            raise ConfigError(f"min_sites must be an integer >= 2, got {min_sites!r}")
        if structure is None:
            structure = (("vector", "float64", (plan.vector_length,)),)
        if sum(math.prod(shape) for _, _, shape in structure) != plan.vector_length:
            raise ConfigError("the model structure does not hold plan.vector_length values")
        self.public = public
        self.structure = tuple(structure)
        self.layout = Layout(plan.vector_length, public.preset.slots, plan.spec.chunk_ciphertexts)
        self.min_sites = min_sites
        self.phase_deadline_s = float(phase_deadline_s)
        self._names = {s: (names or {}).get(s, str(s)) for s in plan.ids}
        self._ids = {name: s for s, name in self._names.items()}
        self.sum = StreamingSum(
            public, self.layout, round_id=plan.round_id, sites=self._names.values()
        )
        self._setup_sent = False
        self._closed = False
        self._survivors: frozenset[int] = frozenset()
        self._outcome_taken = False

    def __repr__(self) -> str:
        return f"CkksServerRound(round={self.plan.round_id}, {self.public!r})"

    def setup(self) -> dict[int, Message]:
        """A :class:`CkksSetup` for every participant. Errors: LocalProtocolError when called
        twice."""
        if self._setup_sent:
            raise LocalProtocolError("setup() was already called")
        self._setup_sent = True
        preset, plan = self.public.preset, self.plan
        return {
            s: CkksSetup(
                round_id=plan.round_id,
                context_sha256=_fingerprint_raw(self.public.fingerprint),
                poly_modulus_degree=preset.poly_modulus_degree,
                scale=float(preset.scale),
                weight=plan.normalised[s],
                vector_length=plan.vector_length,
                chunk_ciphertexts=self.layout.chunk_ciphertexts,
                weights=dict(plan.weights),
                l2_clip=plan.spec.l2_clip,
                phase_deadline_s=self.phase_deadline_s,
            )
            for s in plan.ids
        }

    # -- uploads -----------------------------------------------------------------------------

    def receive(self, site: int, message: Message) -> None:
        """A whole :class:`CkksUpload` or one :class:`CkksFrame` of ``site``'s upload.

        Errors: RemoteProtocolError (refused, nothing of the upload added, the round goes on) for
        another round, a sender other than ``site``, an unexpected site or a frame that fails a
        check; TaintedSumError when a frame fails after earlier frames of the upload were added
        (the round must be run again without that site)."""
        name = self._name(site)
        round_id = getattr(message, "round_id", None)
        if getattr(message, "sender", site) != site:
            raise RemoteProtocolError(f"site {name!r}: the message names another sender")
        if round_id != self.plan.round_id:
            raise RemoteProtocolError(
                f"site {name!r}: a message of round {round_id!r}, this is round "
                f"{self.plan.round_id}"
            )
        if isinstance(message, CkksUpload):
            self.open_upload(site)
            self.feed(site, message.payload)
            self.finish_upload(site)
        elif isinstance(message, CkksFrame):
            if message.chunk == 0:
                self.open_upload(site)
            self.sum.add_frame(name, message.frame)
            if message.last:
                self.finish_upload(site)
        else:
            raise RemoteProtocolError(
                f"site {name!r}: {type(message).__name__} is not a message of a CKKS round"
            )

    def open_upload(self, site: int) -> None:
        """Begin ``site``'s upload (streaming transports). Errors: RemoteProtocolError when the
        stage is closed or the site is not expected or already uploaded."""
        if not self._setup_sent:
            raise LocalProtocolError("an upload before setup()")
        self.sum.open(self._name(site))

    def feed(self, site: int, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of ``site``'s ``CKKS_CIPHERTEXT`` payload, in any split: each frame they
        complete is checked, then added. Errors: as :meth:`receive`."""
        self.sum.feed(self._name(site), data)

    def finish_upload(self, site: int) -> None:
        """``site``'s payload ended (and its transport checksum matched): it must hold every
        frame. Errors: RemoteProtocolError / TaintedSumError as :meth:`receive`."""
        self.sum.finish(self._name(site))

    def abort_upload(self, site: int, reason: str) -> None:
        """``site``'s stream failed in transport; see :meth:`StreamingSum.abort`. Never raises."""
        self.sum.abort(self._names.get(site, str(site)), reason)

    @property
    def expected(self) -> frozenset[int]:
        """Participants whose upload is not complete (empty before setup and after close)."""
        if not self._setup_sent or self._closed:
            return frozenset()
        done = {self._ids[n] for n in self.sum.complete}
        return frozenset(s for s in self.plan.ids if s not in done)

    def take_chunk(self, chunk: int) -> bytes:
        """Chunk-major driving (in process): the sum frame of ``chunk`` once every upload begun
        so far has delivered it; that chunk's running sum is freed. Errors: as
        :meth:`StreamingSum.take`."""
        begun = (*self.sum.complete, *self.sum.open_uploads)
        return self.sum.take(chunk, contributors=begun)

    def close(self) -> dict[int, Message]:
        """Close the upload stage (all uploaded, or the deadline): incomplete uploads are
        dropped. Returns no message (the result is served as the next global model).

        Errors: TaintedSumError when an incomplete upload has frames in the sum; ThresholdError
        for fewer than ``min_sites`` complete uploads."""
        self.sum.close()
        self._closed = True
        if self.sum.tainted:
            raise TaintedSumError(
                f"incomplete uploads of {sorted(self.sum.tainted)} are in the sum",
                self.sum.tainted,
            )
        self._survivors = frozenset(self._ids[n] for n in self.sum.complete)
        if len(self._survivors) < self.min_sites:
            raise ThresholdError(
                f"{len(self._survivors)} sites uploaded ciphertexts, at least {self.min_sites} "
                "are required"
            )
        return {}

    @property
    def done(self) -> bool:
        return self._closed and not self.sum.tainted and len(self._survivors) >= self.min_sites

    @property
    def share(self) -> float:
        """The survivors' share of the total weight (the divisor every site applies)."""
        return math.fsum(self.plan.normalised[s] for s in sorted(self._survivors))

    def outcome(self) -> RoundOutcome:
        """The encrypted weighted sum over the survivors as a ``CKKS_MODEL`` payload
        (``encrypted``; None when the chunks were taken one by one) and its record. Call once:
        the running sums are freed as the payload is built. Errors: LocalProtocolError before
        :attr:`done` or on a second call."""
        if not self.done:
            raise LocalProtocolError("outcome() before the round is done")
        if self._outcome_taken:
            raise LocalProtocolError("outcome() was already called")
        self._outcome_taken = True
        dropped = frozenset(self.plan.ids) - self._survivors
        record: dict[str, Any] = {
            "ckks_fingerprint": self.public.fingerprint,
            "ckks_preset": self.public.preset.name,
            "ckks_share": self.share,
            "survivors": sorted(self._survivors),
            "dropped": sorted(dropped),
            "ciphertexts": self.layout.ciphertexts,
            "chunks": self.layout.chunks,
            "peak_buffered_bytes": self.sum.peak_buffered,
            "peak_pending_chunks": self.sum.peak_pending_chunks,
        }
        frames = tuple(self.sum.sum_frames(min_contributors=self.min_sites))
        blob: bytes | None = None
        if len(frames) == self.layout.chunks:
            blob = encode_model(
                EncryptedModel(
                    fingerprint=self.public.fingerprint,
                    round_id=self.plan.round_id,
                    share=self.share,
                    contributors=len(self._survivors),
                    chunk_ciphertexts=self.layout.chunk_ciphertexts,
                    structure=self.structure,
                    frames=frames,
                )
            )
            del frames
            record.update(sum_sha256=hashlib.sha256(blob).hexdigest(), ckks_model_bytes=len(blob))
        return RoundOutcome(
            survivors=self._survivors,
            dropped=dropped,
            excluded=frozenset(),
            encrypted=blob,
            record=record,
        )

    def result(self, outcome: RoundOutcome) -> CkksResult:
        """The :class:`CkksResult` carrying ``outcome``'s encrypted model to the sites."""
        if outcome.encrypted is None:
            raise LocalProtocolError("the outcome holds no encrypted model")
        return CkksResult(round_id=self.plan.round_id, payload=outcome.encrypted)

    def _name(self, site: int) -> str:
        name = self._names.get(site)
        if name is None:
            raise RemoteProtocolError(f"site {site!r} is not a participant of this round")
        return name


__all__ = ["CkksServerRound", "TaintedSumError"]
