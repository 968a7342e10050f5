"""CKKS rounds over the federation transport: payload formats, context loading, and the sans-IO
steps of the two parties (``protocols/ckks.md``, ``protocols/federation.md`` "CKKS rounds").

Design (the server never holds anything decrypted):

* The server holds the **encrypted global model**: once a CKKS round has completed, the global
  model exists only as the sum ``C = sum_{u in S} Enc(w_u * m_u)`` of the contributors' encrypted,
  weight-scaled new local models ``m_u = global + update_u`` (``w_u = weight_u / W``, ``W`` the
  total weight of the sites that reported), together with the public share
  ``s = sum_{u in S} w_u`` of the contributors. The initial model is public plaintext.
* **Every site decrypts the global model itself** (:func:`decrypt_model`): global ``= Dec(C) / s``,
  the weighted mean over the contributors (a site that dropped out during the upload is simply
  not in ``S``: the division by ``s`` renormalises, so no re-upload is needed). What a site
  decrypts never leaves it: no message of the protocol carries plaintext values from a site.
* The server only checks and adds ciphertexts with the public context (:func:`sum_uploads`); its
  checkpoint and its final artefact are ciphertexts. Sites write the final model.

Payloads: ``CKKS_CIPHERTEXT`` (a site's upload) is the frames of :mod:`secure_fl.he.wire` in chunk
order, each preceded by its length (u64, big-endian). ``CKKS_MODEL`` (the encrypted global model,
:func:`encode_model`) is::

    b"SFLCKMD1" | header length u32 | header JSON | CKKS_CIPHERTEXT-style frames (kind 2, sums)

with the header ``{"format", "fingerprint", "round", "share", "contributors",
"chunk_ciphertexts", "tensors": [{"name", "dtype", "shape"}, ...]}``.

TenSEAL is imported only when a context is loaded.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from secure_fl.errors import ConfigError, RemoteProtocolError
from secure_fl.transport.config import CkksFiles

if TYPE_CHECKING:
    from secure_fl.he import Layout, PublicContext, SecretContext

_LENGTH = struct.Struct(">Q")
_HEAD_LENGTH = struct.Struct(">I")
# Generous bound on one serialised ciphertext: two components of N coefficients, 8 bytes each,
# per ciphertext-level prime (SEAL's zstd-compressed form is smaller), plus its own header.
_CT_OVERHEAD = 4096
_FRAME_OVERHEAD = 1024
_MAX_HEADER = 16 * 1024 * 1024

MODEL_MAGIC = b"SFLCKMD1"
MODEL_FORMAT = "secure_fl/ckks-model/v1"
_FLOAT_DTYPES = ("float16", "float32", "float64")
# A decrypted model may exceed the bound by this fraction of it (the CKKS noise is about 1e-10).
_RANGE_SLACK = 2.0**-20
# Largest chunk_ciphertexts a site accepts (as aggregation.chunk_ciphertexts).
MAX_CHUNK_CIPHERTEXTS = 4096

#: (name, dtype, shape) of each tensor of the model, in order.
Structure = tuple[tuple[str, str, tuple[int, ...]], ...]


def fingerprint_bytes(fingerprint: str) -> bytes:
    """The 32-byte form of a hex fingerprint. Errors: ConfigError."""
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError as exc:
        raise ConfigError("the CKKS fingerprint must be hex") from exc
    if len(raw) != 32:
        raise ConfigError("the CKKS fingerprint must be 32 bytes (64 hex digits)")
    return raw


def load_public(files: CkksFiles | None) -> PublicContext:
    """The server's public context, checked against the federation's fingerprint.

    Errors: ConfigError when there is no ``ckks`` section, the artefact is the secret one (or holds
    a secret key), is unreadable or corrupted, or has another fingerprint.
    """
    if files is None:
        raise ConfigError(
            "aggregation.protocol 'ckks' needs a 'ckks' section (the public context artefact and "
            "the federation's fingerprint, as written by secure-fl provision)"
        )
    from secure_fl.he import PublicContext

    fingerprint_bytes(files.fingerprint)
    return PublicContext.load(files.context, expected_fingerprint=files.fingerprint)


def load_secret(files: CkksFiles | None) -> SecretContext:
    """A site's secret context, checked against the federation's fingerprint.

    Errors: ConfigError when there is no ``ckks`` section, the artefact is the public one, is
    readable by group or others, unreadable, corrupted, or has another fingerprint.
    """
    if files is None:
        raise ConfigError("this federation aggregates with CKKS but the site config has no 'ckks'")
    from secure_fl.he import SecretContext

    fingerprint_bytes(files.fingerprint)
    return SecretContext.load(files.context, expected_fingerprint=files.fingerprint)


def pack_frames(frames: Iterable[bytes]) -> bytes:
    """The payload of ``frames``: each preceded by its length (u64, big-endian)."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(_LENGTH.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def _split_frames(view: memoryview, what: str, *, limit: int | None = None) -> list[bytes]:
    """Split length-prefixed frames (u64 big-endian lengths) that fill ``view`` exactly.

    Errors: RemoteProtocolError (naming ``what``) when a length runs past the end, a frame is
    empty, or more than ``limit`` frames are present.
    """
    frames: list[bytes] = []
    offset = 0
    while offset < len(view):
        if limit is not None and len(frames) == limit:
            raise RemoteProtocolError(f"{what} holds more than {limit} frames")
        if offset + _LENGTH.size > len(view):
            raise RemoteProtocolError(f"{what} ends inside a frame length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if length == 0 or offset + length > len(view):
            raise RemoteProtocolError(f"{what}: a frame is empty or runs past the end")
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    return frames


def unpack_frames(data: bytes | bytearray | memoryview, count: int) -> list[bytes]:
    """Split a payload into exactly ``count`` frames.

    Errors: RemoteProtocolError when a length runs past the end, a frame is empty, or the payload
    holds another number of frames or trailing bytes.
    """
    frames = _split_frames(memoryview(data).cast("B"), "the CKKS payload", limit=count)
    if len(frames) != count:
        raise RemoteProtocolError(f"the CKKS payload holds {len(frames)} frames, expected {count}")
    return frames


def max_payload_bytes(layout: Layout, poly_modulus_degree: int, primes: int) -> int:
    """An upper bound on the size of an honest payload of ``layout`` (checked on the header)."""
    per_ct = 2 * poly_modulus_degree * 8 * max(1, primes) + _CT_OVERHEAD
    return layout.ciphertexts * per_ct + layout.chunks * (_FRAME_OVERHEAD + _LENGTH.size)


def structure_of(model: Mapping[str, np.ndarray]) -> Structure:
    """The public structure of a model: (name, dtype, shape) of each tensor, in order."""
    return tuple(
        (name, str(v.dtype.name), tuple(int(d) for d in v.shape)) for name, v in model.items()
    )


def structure_size(structure: Structure) -> int:
    """Values in a model of ``structure``."""
    return sum(math.prod(shape) for _, _, shape in structure)


@dataclass(frozen=True)
class EncryptedModel:
    """A decoded ``CKKS_MODEL`` payload: the encrypted global model after round ``round_id``.

    ``frames`` are the server's sum frames (kind 2) of ``sum_u Enc(w_u * m_u)`` over
    ``contributors`` sites whose normalised weights add up to ``share``.
    """

    fingerprint: str
    round_id: int
    share: float
    contributors: int
    chunk_ciphertexts: int
    structure: Structure
    frames: tuple[bytes, ...] = field(repr=False)

    @property
    def vector_length(self) -> int:
        return structure_size(self.structure)


def encode_model(model: EncryptedModel) -> bytes:
    """The ``CKKS_MODEL`` payload of ``model`` (the inverse of :func:`decode_model`)."""
    header = {
        "format": MODEL_FORMAT,
        "fingerprint": model.fingerprint,
        "round": model.round_id,
        "share": model.share,
        "contributors": model.contributors,
        "chunk_ciphertexts": model.chunk_ciphertexts,
        "tensors": [
            {"name": name, "dtype": dtype, "shape": list(shape)}
            for name, dtype, shape in model.structure
        ],
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([MODEL_MAGIC, _HEAD_LENGTH.pack(len(head)), head, pack_frames(model.frames)])


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def decode_model(data: bytes | bytearray | memoryview) -> EncryptedModel:
    """Parse a ``CKKS_MODEL`` payload (structure only: nothing is decrypted).

    Errors: RemoteProtocolError naming what is wrong (magic, header, fields out of range, tensor
    list, number of frames).
    """
    view = memoryview(data).cast("B")
    if len(view) < len(MODEL_MAGIC) + _HEAD_LENGTH.size or bytes(view[:8]) != MODEL_MAGIC:
        raise RemoteProtocolError("not an encrypted secure_fl model (bad magic)")
    (head_len,) = _HEAD_LENGTH.unpack_from(view, 8)
    start = 8 + _HEAD_LENGTH.size
    if head_len > min(_MAX_HEADER, len(view) - start):
        raise RemoteProtocolError("the encrypted model's header length is out of range")
    try:
        header = json.loads(bytes(view[start : start + head_len]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteProtocolError("the encrypted model's header is not JSON") from exc
    if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
        raise RemoteProtocolError(f"the encrypted model's header is not {MODEL_FORMAT!r}")
    fingerprint: Any = header.get("fingerprint")
    round_id: Any = header.get("round")
    share: Any = header.get("share")
    contributors: Any = header.get("contributors")
    chunk_ciphertexts: Any = header.get("chunk_ciphertexts")
    tensors: Any = header.get("tensors")
    if not isinstance(fingerprint, str):
        raise RemoteProtocolError("the encrypted model names no fingerprint")
    fingerprint_bytes_checked(fingerprint)
    if not _is_int(round_id, 0, 2**64 - 1):
        raise RemoteProtocolError(f"the encrypted model's round {round_id!r} is out of range")
    if (
        isinstance(share, bool)
        or not isinstance(share, int | float)
        or not 0 < float(share) <= 1 + 1e-9
    ):
        raise RemoteProtocolError(f"the encrypted model's share {share!r} is not in (0, 1]")
    if not _is_int(contributors, 1, 2**32 - 1):
        raise RemoteProtocolError(f"the encrypted model's contributors {contributors!r} is invalid")
    if not _is_int(chunk_ciphertexts, 1, MAX_CHUNK_CIPHERTEXTS):
        raise RemoteProtocolError(
            f"the encrypted model's chunk_ciphertexts must be in [1, {MAX_CHUNK_CIPHERTEXTS}]"
        )
    if not isinstance(tensors, list) or not tensors:
        raise RemoteProtocolError("the encrypted model names no tensors")
    structure: list[tuple[str, str, tuple[int, ...]]] = []
    for entry in tensors:
        name = entry.get("name") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(name, str)
            or not name
            or dtype not in _FLOAT_DTYPES
            or not isinstance(shape, list)
            or not all(_is_int(d, 0, 2**40) for d in shape)
        ):
            raise RemoteProtocolError("the encrypted model's tensor list is malformed")
        structure.append((name, str(dtype), tuple(int(d) for d in shape)))
    if len({s[0] for s in structure}) != len(structure):
        raise RemoteProtocolError("the encrypted model names a tensor twice")
    frames = _split_frames(view[start + head_len :], "the encrypted model")
    return EncryptedModel(
        fingerprint=fingerprint,
        round_id=int(round_id),
        share=float(share),
        contributors=int(contributors),
        chunk_ciphertexts=int(chunk_ciphertexts),
        structure=tuple(structure),
        frames=tuple(frames),
    )


def fingerprint_bytes_checked(fingerprint: str) -> bytes:
    """As :func:`fingerprint_bytes`, raising RemoteProtocolError (the value came from a peer)."""
    try:
        return fingerprint_bytes(fingerprint)
    except ConfigError as exc:
        raise RemoteProtocolError(str(exc)) from None


# -- the server's step: add ciphertexts, never decrypt ---------------------------------------------


def sum_uploads(
    public: PublicContext,
    layout: Layout,
    round_id: int,
    uploads: Mapping[str, Sequence[bytes]],
) -> list[bytes]:
    """The server's sum frames, chunk by chunk, of the (already checked) ``uploads`` (site name
    -> its frames). Only the public context is used: nothing is decrypted.

    Errors: ConfigError for a secret context; RemoteProtocolError for a bad frame (see
    :class:`secure_fl.he.CiphertextSummer`).
    """
    from secure_fl.he import CiphertextSummer

    summer = CiphertextSummer(
        public, layout, round_id=round_id, expected_fingerprint=public.fingerprint
    )
    names = sorted(uploads)
    sums = []
    for chunk in range(layout.chunks):
        for name in names:
            summer.add(name, uploads[name][chunk])
        sums.append(summer.pop(chunk, expected=names))
    return sums


# -- the site's steps: decrypt the global model locally, encrypt the new local model --------------


def decrypt_model(
    secret: SecretContext,
    data: bytes | bytearray | memoryview,
    *,
    expected_round: int | None = None,
    expected_structure: Structure | None = None,
    expected_size: int | None = None,
    min_contributors: int = 2,
) -> dict[str, np.ndarray]:
    """Decrypt the encrypted global model **at the site**; the result must never leave the site.

    Checks before anything is decrypted (they depend only on what the server sent, so refusing
    the round for them tells the server nothing it did not know): the header (format, fields in
    range), the fingerprint is this site's, the round is ``expected_round`` (when given), the
    tensors are ``expected_structure`` (when given: the model this site already holds) and hold
    ``expected_size`` values (when given: the length the site pins in its policy), the number of
    frames matches the layout of the tensors, at least ``min_contributors`` sites are summed (as the
    server states it: a global model of one site would show that site's update to every other
    site), and **every** frame's header (kind sum, fingerprint, round, chunk, sizes).

    Checks after decryption (each ciphertext decrypts under this site's key to the announced
    number of values; every value, divided by the share and cast to its tensor's dtype, is finite
    and within the preset's ``max_abs``; a wrapped-around or foreign-key ciphertext decrypts far
    beyond it): their outcome depends on the secret key, and a server that adds plaintext offsets
    to ciphertexts (public key only) could turn a per-round refusal into a decryption oracle. So
    any failure from the first decryption on raises :class:`~secure_fl.errors.PostDecryptionError`,
    whose message names the check but holds no decrypted value; the caller must stop for good
    (``protocols/ckks.md``, "Fail closed").

    Errors: RemoteProtocolError for a payload that fails a check before decryption;
    PostDecryptionError for every failure after the first decryption.
    """
    from secure_fl.errors import PostDecryptionError
    from secure_fl.he import Layout, SumDecryptor
    from secure_fl.he.wire import KIND_SUM, decode_frame

    model = decode_model(data)
    if model.fingerprint != secret.fingerprint:
        raise RemoteProtocolError(
            f"the encrypted model is under CKKS context {model.fingerprint[:16]}..., not the "
            f"federation's {secret.fingerprint[:16]}..."
        )
    if expected_round is not None and model.round_id != expected_round:
        raise RemoteProtocolError(
            f"the encrypted model is the result of round {model.round_id}, expected round "
            f"{expected_round}"
        )
    if expected_structure is not None and model.structure != tuple(expected_structure):
        raise RemoteProtocolError("the encrypted model's tensors differ from this site's model")
    if model.contributors < min_contributors:
        raise RemoteProtocolError(
            f"the encrypted model sums {model.contributors} site(s); at least {min_contributors} "
            "are required (a global model of one site would reveal its update)"
        )
    size = model.vector_length
    if size == 0:
        raise RemoteProtocolError("the encrypted model holds no values")
    if expected_size is not None and size != expected_size:
        raise RemoteProtocolError(
            f"the encrypted model holds {size} values, this site expects {expected_size}"
        )
    layout = Layout(size, secret.preset.slots, model.chunk_ciphertexts)
    if len(model.frames) != layout.chunks:
        raise RemoteProtocolError(
            f"the encrypted model holds {len(model.frames)} frames, its layout {layout.chunks}"
        )
    # Every frame header first, so that no refusal for a header can follow a decryption.
    for chunk, frame in enumerate(model.frames):
        parsed = decode_frame(frame)
        start, stop = layout.chunk_range(chunk)
        if (
            parsed.kind != KIND_SUM
            or parsed.fingerprint != secret.fingerprint
            or parsed.round_id != model.round_id
            or parsed.chunk != chunk
            or parsed.contributors != model.contributors
            or parsed.values != stop - start
            or len(parsed.blobs) != len(layout.pieces(chunk))
        ):
            raise RemoteProtocolError(
                f"sum of chunk {chunk}: not a sum frame of this model (kind, context, round, "
                "chunk, contributors or sizes differ from the header)"
            )
    decryptor = SumDecryptor(secret, layout, round_id=model.round_id)
    bound = secret.preset.max_abs
    flat = np.empty(size, dtype=np.float64)
    for chunk, frame in enumerate(model.frames):
        start, stop = layout.chunk_range(chunk)
        try:
            flat[start:stop] = decryptor.decrypt(
                frame, chunk=chunk, contributors=model.contributors
            )
        except Exception as exc:  # from the first decryption on, every failure fails closed
            # The decryptor's message may quote decrypted magnitudes: it is not passed on.
            raise PostDecryptionError(
                f"chunk {chunk} of the encrypted global model failed the check after decryption "
                f"({type(exc).__name__}): a ciphertext does not decrypt under this site's key, "
                f"decrypts to the wrong number of values, or to values beyond the bound {bound:g}"
                " (corrupted, tampered or foreign ciphertexts)"
            ) from None
    flat /= model.share
    out: dict[str, np.ndarray] = {}
    offset = 0
    with np.errstate(over="ignore", invalid="ignore"):
        peak = float(np.max(np.abs(flat)))
        finite = math.isfinite(peak)
        for name, dtype, shape in model.structure:
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].reshape(shape).astype(dtype)
            finite = finite and bool(np.all(np.isfinite(out[name])))
            offset += n
    if not finite or peak > bound * (1 + _RANGE_SLACK):
        raise PostDecryptionError(
            "the decrypted global model holds "
            + ("non-finite values" if not finite else "values beyond the bound")
            + f" (bound {bound:g}, that no honest model exceeds; the value is not logged): "
            "corrupted, tampered or foreign ciphertexts, or a wrong share"
        )
    return out


def check_local_model(secret: SecretContext, vector: npt.NDArray[np.float64]) -> None:
    """Check this site's new local model (global + update) before it reports its weight: every
    value finite and within the preset's ``max_abs`` (what CKKS can carry).

    The outcome depends on the site's secret update, and the server chooses the model it is
    added to (it can shift an encrypted model with the public key alone), so a per-round refusal
    would be a one-bit oracle on the update: a failure is a
    :class:`~secure_fl.errors.PostDecryptionError` (fail closed), whose message holds no value.
    """
    from secure_fl.errors import PostDecryptionError

    with np.errstate(invalid="ignore"):
        peak = float(np.max(np.abs(vector))) if vector.size else 0.0
    if not math.isfinite(peak):
        raise PostDecryptionError("this site's new local model holds non-finite values")
    if peak > secret.preset.max_abs:
        raise PostDecryptionError(
            "this site's new local model holds values beyond the bound "
            f"{secret.preset.max_abs:g} of CKKS preset {secret.preset.name!r} (the value is not "
            "logged): lower the learning rate or clip, or provision a preset with a larger max_abs"
        )


def local_model_vector(
    model: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
) -> npt.NDArray[np.float64]:
    """The site's new local model ``global + update``, flattened, in float64.

    Errors: InvalidUpdateError when the update does not have the model's structure.
    """
    from secure_fl.encoding import flatten
    from secure_fl.errors import InvalidUpdateError

    if list(model) != list(update) or any(np.shape(model[k]) != np.shape(update[k]) for k in model):
        raise InvalidUpdateError("the update does not have the model's names and shapes")
    base, _ = flatten({k: np.asarray(v, dtype=np.float64) for k, v in model.items()})
    delta, _ = flatten({k: np.asarray(v, dtype=np.float64) for k, v in update.items()})
    out: npt.NDArray[np.float64] = base + delta
    return out


def encrypt_local_model(
    secret: SecretContext,
    vector: npt.NDArray[np.float64],
    *,
    weight: float,
    round_id: int,
    chunk_ciphertexts: int,
    site: str | None = None,
) -> tuple[bytes, Layout]:
    """The site's upload: a **fresh** encryption of ``weight * vector`` (its new local model), as a
    ``CKKS_CIPHERTEXT`` payload, and its layout. Fresh randomness for every ciphertext: nothing
    the site received is re-sent.

    Errors: InvalidUpdateError for values that are not finite or beyond ``max_abs``; ConfigError
    for a bad weight or chunk size; CryptoError if TenSEAL fails.
    """
    from secure_fl.he import Layout, SiteEncryptor

    layout = Layout(int(vector.shape[0]), secret.preset.slots, int(chunk_ciphertexts))
    encryptor = SiteEncryptor(secret, layout, expected_fingerprint=secret.fingerprint)
    payload = pack_frames(
        encryptor.stream(vector, factor=float(weight), round_id=round_id, site=site)
    )
    return payload, layout
