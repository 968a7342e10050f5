"""The in-process CKKS round: the round halves of :mod:`secure_fl.rounds.ckks`, driven chunk-major.

Chunk ``c`` of every surviving site, its sum (the server half, public context only), its
decryption by a site, then chunk ``c + 1``: at any time the process holds one frame per site,
one chunk sum and the plaintext vectors (``protocols/ckks.md``, "Streaming"). This is what
:class:`secure_fl.aggregators.ckks.CKKSAggregator` and :func:`secure_fl.he.encrypted_mean` run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_fl.encoding import l2_clip
from secure_fl.he.context import PublicContext, SecretContext
from secure_fl.he.decrypt import RoundStats, require_two_contributors
from secure_fl.he.packing import DEFAULT_CHUNK_CIPHERTEXTS
from secure_fl.rounds.ckks_server import CkksServerRound
from secure_fl.rounds.ckks_site import CkksSiteRound
from secure_fl.rounds.plan import plan_round
from secure_fl.rounds.spec import AggregationSpec

FloatVector = npt.NDArray[np.float64]


def run_ckks_local(
    secret: SecretContext,
    public: PublicContext,
    vectors: Mapping[str, npt.NDArray[Any]],
    weights: Mapping[str, float],
    included: Sequence[str],
    *,
    round_id: int = 0,
    chunk_ciphertexts: int = DEFAULT_CHUNK_CIPHERTEXTS,
    l2_clip_norm: float | None = None,
    reference: bool = True,
    pool: Any = None,
) -> tuple[FloatVector, RoundStats, list[str]]:
    """Weighted mean of ``vectors[s]`` over ``included`` under CKKS, in process.

    ``weights`` names every site of the round (dropped ones too: each included site scales by
    ``weight / total``, and the mean divides by the included sites' share). Each included site
    runs a :class:`CkksSiteRound` (``fail_closed=False``: one process holds everything here) with
    ``secret``; the server runs a :class:`CkksServerRound` with ``public`` only. With
    ``l2_clip_norm`` every site clips its vector in L2 first (listed in the third result). With
    ``reference`` the float64 plaintext mean is computed alongside to measure the error. Returns
    the mean, the costs and the clipped sites.

    An empty vector gives the empty mean at no cost (:meth:`RoundStats.empty`).

    Errors: ThresholdError for fewer than two included sites (checked first:
    :func:`~secure_fl.he.decrypt.require_two_contributors`); InvalidUpdateError for a vector
    beyond the preset's bound or non-finite (every site checks before anything is encrypted);
    ConfigError for bad weights or lengths; the errors of the round halves.
    """
    require_two_contributors(len(included))
    size = int(np.shape(vectors[included[0]])[0])
    if size == 0:
        return np.zeros(0, dtype=np.float64), RoundStats.empty(included, reference=reference), []
    sites = list(weights)
    ids = {name: i + 1 for i, name in enumerate(sites)}
    spec = AggregationSpec(
        protocol="ckks",
        preset=secret.preset.name,
        l2_clip=l2_clip_norm,
        chunk_ciphertexts=chunk_ciphertexts,
    )
    plan = plan_round(
        spec, {ids[s]: float(weights[s]) for s in sites}, vector_length=size, round_id=round_id
    )
    server = CkksServerRound(plan, public, names={i: s for s, i in ids.items()})
    setups = server.setup()
    halves = {
        s: CkksSiteRound(ids[s], secret=secret, name=s, fail_closed=False, pool=pool, stream=True)
        for s in included
    }
    clipped: list[str] = []
    plain_vectors: dict[str, FloatVector] = {}
    for s in included:  # every site checks its setup and vector before anything is encrypted
        vector = np.asarray(vectors[s], dtype=np.float64)
        halves[s].on_setup(setups[ids[s]], update=vector, reported_weight=float(weights[s]))
        if halves[s].l2_clipped and l2_clip_norm is not None:
            clipped.append(s)
            vector, _ = l2_clip(vector, l2_clip_norm)
        plain_vectors[s] = vector
    share = plan.surviving_weight({ids[s] for s in included})
    included_weight = math.fsum(float(weights[s]) for s in included)
    mean = np.empty(size, dtype=np.float64)
    bytes_sent = dict.fromkeys(included, 0)
    site_seconds = dict.fromkeys(included, 0.0)
    server_seconds = decrypt_seconds = 0.0
    server_bytes = 0
    max_error = peak = 0.0
    streams = {s: halves[s].frames() for s in included}
    decrypting = halves[included[0]]  # every site decrypts the same sum; one stands for all
    for chunk in range(server.layout.chunks):
        for s in included:
            t0 = time.perf_counter()
            message = next(streams[s])
            t1 = time.perf_counter()
            server.receive(ids[s], message)
            server_seconds += time.perf_counter() - t1
            site_seconds[s] += t1 - t0
            bytes_sent[s] += len(message.frame)
            del message
        t0 = time.perf_counter()
        summed = server.take_chunk(chunk)
        t1 = time.perf_counter()
        values = decrypting.decrypt_chunk(
            summed, chunk=chunk, contributors=len(included), share=share
        )
        decrypt_seconds += time.perf_counter() - t1
        server_seconds += t1 - t0
        server_bytes += len(summed)
        del summed
        start, stop = server.layout.chunk_range(chunk)
        mean[start:stop] = values
        if reference:
            plain = np.zeros(stop - start, dtype=np.float64)
            for s in included:
                plain += float(weights[s]) * plain_vectors[s][start:stop]
            plain /= included_weight
            max_error = max(max_error, float(np.max(np.abs(values - plain))))
            peak = max(peak, float(np.max(np.abs(plain))))
    server.close()
    server.outcome()  # every chunk was taken one by one: only the record remains
    if reference:
        rel = max_error / peak if peak > 0 else max_error
    else:
        max_error = rel = peak = float("nan")
    stats = RoundStats(
        bytes_sent=bytes_sent,
        site_seconds=site_seconds,
        server_seconds=server_seconds,
        decrypt_seconds=decrypt_seconds,
        server_bytes_sent=server_bytes,
        ciphertexts=server.layout.ciphertexts,
        chunks=server.layout.chunks,
        peak_pending_chunks=server.sum.peak_pending_chunks,
        max_error=max_error,
        max_rel_error=rel,
        mean_abs_peak=peak,
    )
    return mean, stats, clipped


__all__ = ["run_ckks_local"]
