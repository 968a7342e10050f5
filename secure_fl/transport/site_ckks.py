"""A site's part in one CKKS round over the wire (no sockets): the wire conversion around
:class:`~secure_fl.rounds.ckks.CkksSiteRound`, where the setup checks and the encryption live.

Guarantee: the only CKKS data this site sends is a fresh encryption of its own new local model
(global + update) scaled by its normalised weight, after the setup's fingerprint, parameters,
weight and vector length were checked against the federation's, the model's and the site's
policy (by the round half). Nothing in the setup refuses on the site's own values: the round
half (``fail_closed=True``) refuses only what the server sent (a served model beyond the preset's
bound: :func:`~secure_fl.he.site.check_base`) and clips the new local model into the preset's
range, the count logged on this site only (a refusal would be a one-bit oracle on the update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from secure_fl.encoding import flatten
from secure_fl.errors import PostDecryptionError
from secure_fl.rounds.ckks import CkksSiteRound, ckks_setup_from_pb
from secure_fl.rounds.messages import CkksSetup, CkksUpload
from secure_fl.transport._generated import federation_pb2 as pb
from secure_fl.transport.config import SiteConfig
from secure_fl.transport.site_replies import Reply, Upload
from secure_fl.transport.tasks import TaskResult
from secure_fl.transport.tensors import Tensors


def setup_from_pb(setup: pb.CkksSetup, round_id: int) -> CkksSetup:
    """The round layer's :class:`CkksSetup` of a protobuf CkksSetup for round ``round_id`` (the
    wire lists no participants' weights: the weight is checked to be in (0, 1]); the one
    conversion, :func:`secure_fl.rounds.ckks.ckks_setup_from_pb`."""
    return ckks_setup_from_pb(setup, round_id)


def encrypt_upload(
    secret: Any,
    setup: pb.CkksSetup,
    *,
    config: SiteConfig,
    model: Tensors,
    result: TaskResult,
    round_id: int,
    round_number: int,
    log: Any,
    fail_closed: Callable[[str], NoReturn],
) -> list[Reply]:
    """Check ``setup`` (:meth:`CkksSiteRound.on_setup`), then encrypt ``weight * (model +
    update)`` with fresh randomness; returns the ciphertext upload (``round_number``: the
    federation round from 1, for the log). The new local model is clipped into the preset's
    range, never refused (:meth:`CkksSiteRound.on_setup` with ``fail_closed=True``). Errors:
    PolicyError / RemoteProtocolError (the round is refused, nothing sent); a PostDecryptionError
    of the round half (a check whose outcome depends on secret values) calls ``fail_closed``."""
    half = CkksSiteRound(
        config.site_id, secret=secret, policy=config.policy, name=config.name, fail_closed=True
    )
    base, _ = flatten(dict(model))
    delta, _ = flatten(dict(result.update))
    try:
        out = half.on_setup(
            setup_from_pb(setup, round_id),
            update=delta.astype("float64", copy=False),
            reported_weight=float(result.weight),
            base=base.astype("float64", copy=False),
        )
        del base, delta
        upload = out if isinstance(out, CkksUpload) else half.upload()
    except PostDecryptionError as exc:
        # Not raised for the range of the new local model (clipped); any such check depends on
        # secret values.
        fail_closed(f"the CKKS setup failed a check that depends on secret values ({exc})")
    layout = half.layout
    if layout is None:  # pragma: no cover - upload() raised already
        raise RuntimeError("no layout after the upload")
    log.info(
        "ckks-encrypted",
        round=round_number,
        round_id=round_id,
        ciphertexts=layout.ciphertexts,
        frames=layout.chunks,
        bytes=len(upload.payload),
    )
    header = pb.PayloadHeader(
        kind=pb.CKKS_CIPHERTEXT,
        round_id=round_id,
        length=layout.chunks,
        ckks=pb.CkksPayloadInfo(
            context_sha256=setup.context_sha256,
            ciphertexts=layout.ciphertexts,
            weight=setup.weight,
        ),
    )
    return [Upload("UploadCiphertext", header, upload.payload)]
