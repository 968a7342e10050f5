"""The site's CKKS steps: decrypt the encrypted global model locally, check its own vector.

Everything here runs at a site, with the federation's secret context, and nothing it decrypts may
leave the site (``protocols/ckks.md``). The round recipe that calls these (and encrypts the
site's upload) is :mod:`secure_fl.rounds.ckks`; :mod:`secure_fl.transport.ckks` re-exports them
for the gRPC site.

Fail closed: every check whose outcome depends on secret values after the first decryption (and
:func:`check_local_model`, the gRPC site's range check of its own vector) raises
:class:`~secure_fl.errors.PostDecryptionError`, whose message names the check and never a value;
the caller must stop for good. A round's setup never refuses on the site's own values: it
refuses only on what the server sent (:func:`check_base`) and clips the rest
(:func:`clip_local_model`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from secure_fl.errors import PostDecryptionError, RemoteProtocolError
from secure_fl.he.context import SecretContext
from secure_fl.he.decrypt import SumDecryptor
from secure_fl.he.model import Structure, decode_model
from secure_fl.he.packing import Layout
from secure_fl.he.wire import KIND_SUM, decode_frame

# A decrypted model may exceed the bound by this fraction of it (the CKKS noise is about 1e-10).
_RANGE_SLACK = 2.0**-20


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


def check_base(secret: SecretContext, base: npt.NDArray[np.float64]) -> None:
    """Check the model the server sent in the clear (the base the site's update is added to):
    every value finite and within the preset's ``max_abs``.

    The outcome depends only on what the server sent, so refusing the round for it tells the
    server nothing it did not know (the data-dependent part, :func:`clip_local_model`, never
    refuses). Errors: PolicyError naming the bound (never a value of the site's).
    """
    from secure_fl.errors import PolicyError

    with np.errstate(invalid="ignore"):
        peak = float(np.max(np.abs(base))) if base.size else 0.0
    if not math.isfinite(peak) or peak > secret.preset.max_abs:
        raise PolicyError(
            "the model the server sent holds values that are not finite or beyond the bound "
            f"{secret.preset.max_abs:g} of CKKS preset {secret.preset.name!r}; the round is refused"
        )


def clip_local_model(
    secret: SecretContext,
    update: npt.NDArray[np.float64],
    base: npt.NDArray[np.float64] | None = None,
) -> tuple[npt.NDArray[np.float64], int]:
    """This site's new local model ``base + update`` brought within what CKKS carries, and the
    number of values that had to be changed (the caller logs it locally; it is never sent).

    Every non-finite value of the update becomes 0 (the base's value is kept), then every value
    of ``base + update`` beyond the preset's ``max_abs`` is clipped to it. It never refuses:
    the outcome depends on the site's secret update and the server chooses the base, so a
    refusal would be a one-bit oracle on the update (the server can place the base so that
    "refused" answers any threshold question about the data). Check the base first with
    :func:`check_base` (a base within the bound makes the clipped update agree in sign with the
    true one on every value). ``update`` is not modified.

    Errors: InvalidUpdateError when ``base`` and ``update`` differ in shape or are not 1-D.
    """
    from secure_fl.errors import InvalidUpdateError

    if update.ndim != 1 or (base is not None and np.shape(base) != update.shape):
        raise InvalidUpdateError("the update and base must be flat vectors of one length")
    vector = np.array(update, dtype=np.float64)  # a copy
    finite = np.isfinite(vector)
    changed = int(vector.size - np.count_nonzero(finite))
    if changed:
        vector[~finite] = 0.0
    if base is not None:
        vector += np.asarray(base, dtype=np.float64)
    bound = secret.preset.max_abs
    beyond = np.abs(vector) > bound
    over = int(np.count_nonzero(beyond))
    if over:
        np.clip(vector, -bound, bound, out=vector)
    return vector, changed + over


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
