"""CKKS homomorphic encryption (TenSEAL) behind the aggregator interface.

Each surviving site scales its flat update by its normalised weight, encrypts it into full
ciphertexts and streams them chunk by chunk; the server adds ciphertexts under the public context
only and never sees a decryption; the sites decrypt the sum themselves and divide by the
survivors' share of the weight. The returned mean is the site role's result (what every site
computes locally). In this in-process aggregator one object plays every role, but each role runs
through the round halves of :mod:`secure_fl.rounds.ckks` (the same recipe the gRPC server and
sites run), each with only the context it is entitled to, driven chunk-major by
:func:`secure_fl.rounds.ckks_local.run_ckks_local`. At least two sites must contribute
(ThresholdError otherwise), as over the network.

Threat model in one line: every site holds the same secret key, so a server colluding with any one
site can decrypt every update; pairwise-masking SecAgg (``secagg`` / ``secagg+``) does not have this
weakness. See ``protocols/ckks.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import NoReturn

from secure_fl.aggregators.base import (
    AggregationReport,
    AggregationResult,
    Aggregator,
    Updates,
    check_l2_clip,
    prepare,
)
from secure_fl.encoding import unflatten
from secure_fl.errors import ConfigError
from secure_fl.he.context import PublicContext, SecretContext, check_fingerprint
from secure_fl.he.decrypt import require_two_contributors
from secure_fl.he.packing import DEFAULT_CHUNK_CIPHERTEXTS
from secure_fl.he.parallel import EncryptionPool
from secure_fl.he.params import CKKSPreset, get_preset
from secure_fl.rounds.ckks_local import run_ckks_local


class CKKSAggregator(Aggregator):
    """Weighted FedAvg mean under CKKS encryption, with dropouts.

    Options (keyword only):

    * ``preset`` — a preset name or :class:`~secure_fl.he.params.CKKSPreset` (default
      ``"n8192-add"``: N = 8192, two primes, |value| <= 512, expansion about 7.6x). Used to
      generate keys; when contexts are given it must match theirs.
    * ``secret`` — the sites' secret context: a :class:`~secure_fl.he.context.SecretContext` or
      the path of a provisioned secret artefact. None (default): keys are generated in process for
      a simulation and kept for the aggregator's life.
    * ``public`` — the server's context: a :class:`~secure_fl.he.context.PublicContext` or the
      path of the public artefact; None: derived from ``secret``. A secret context is refused.
    * ``fingerprint`` — the federation's fingerprint; both contexts must carry it.
    * ``chunk_ciphertexts`` — ciphertexts per streamed chunk (default 64); memory for ciphertexts
      stays about ``3 * chunk_ciphertexts * 16 * N`` bytes whatever the model size.
    * ``l2_clip`` — optional L2 bound on each whole update; clipped updates are listed in the
      report. Values beyond the preset's ``max_abs`` are refused, never clipped.
    * ``workers`` — encrypt in this many worker processes (default 1: in this process). TenSEAL
      encrypts on one core and holds the GIL, so only processes help. A site encrypting its own
      update on two cores gains about 1.3x (:class:`~secure_fl.he.parallel.EncryptionPool`); in
      this in-process simulation the same process also does the server's and the decryptor's work
      and receives every frame over a pipe, so on two cores ``workers=2`` is not faster. The
      workers start on the first round (about 0.3 s), receive the secret context over a local
      pipe, and stop at :meth:`close` (or when the aggregator is garbage-collected).
    * ``measure_error`` — compute the float64 plaintext mean alongside to report the error
      (default True; possible only in simulation, where the plaintext is at hand).

    Errors: ConfigError for invalid options, a secret context offered to the server, or contexts
    whose fingerprints differ; at ``aggregate``: ThresholdError for fewer than two surviving
    sites, InvalidUpdateError (see :func:`prepare`, plus
    values beyond ``max_abs``), and the errors of :func:`secure_fl.rounds.ckks_local.run_ckks_local`.
    """

    name = "ckks"

    def __init__(
        self,
        *,
        preset: str | CKKSPreset | None = None,
        secret: SecretContext | str | os.PathLike[str] | None = None,
        public: PublicContext | str | os.PathLike[str] | None = None,
        fingerprint: str | None = None,
        chunk_ciphertexts: int = DEFAULT_CHUNK_CIPHERTEXTS,
        l2_clip: float | None = None,
        measure_error: bool = True,
        workers: int = 1,
    ) -> None:
        if (
            isinstance(chunk_ciphertexts, bool)
            or not isinstance(chunk_ciphertexts, int)
            or chunk_ciphertexts < 1
        ):
            raise ConfigError(
                f"chunk_ciphertexts must be an integer >= 1, got {chunk_ciphertexts!r}"
            )
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        if not isinstance(measure_error, bool):
            raise ConfigError(f"measure_error must be a bool, got {measure_error!r}")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ConfigError(f"fingerprint must be a hex string, got {type(fingerprint).__name__}")
        wanted = get_preset(preset) if preset is not None else None

        if secret is None:
            site_ctx = SecretContext.generate(wanted)
        elif isinstance(secret, SecretContext):
            site_ctx = secret
        elif isinstance(secret, str | os.PathLike):
            site_ctx = SecretContext.load(secret)
        else:
            raise ConfigError(
                f"secret must be a SecretContext, a path or None, got {type(secret).__name__}"
            )

        if public is None:
            server_ctx = site_ctx.public()
        elif isinstance(public, SecretContext):
            raise ConfigError(
                "public is a SecretContext: a server holding the secret key could read every "
                "site's update; pass SecretContext.public() or the public artefact"
            )
        elif isinstance(public, PublicContext):
            server_ctx = public
        elif isinstance(public, str | os.PathLike):
            server_ctx = PublicContext.load(public)
        else:
            raise ConfigError(
                f"public must be a PublicContext, a path or None, got {type(public).__name__}"
            )

        check_fingerprint(site_ctx.fingerprint, fingerprint, "the sites' secret context")
        check_fingerprint(server_ctx.fingerprint, fingerprint, "the server's public context")
        check_fingerprint(server_ctx.fingerprint, site_ctx.fingerprint, "the server's context")
        if wanted is not None and wanted != site_ctx.preset:
            raise ConfigError(
                f"preset {wanted.name!r} differs from the contexts' preset {site_ctx.preset.name!r}"
            )
        self._secret = site_ctx
        self._public = server_ctx
        self.preset = site_ctx.preset
        self.fingerprint = site_ctx.fingerprint
        self.chunk_ciphertexts = chunk_ciphertexts
        self.l2_clip = check_l2_clip(l2_clip)
        self.measure_error = measure_error
        self.workers = workers
        self._pool: EncryptionPool | None = None
        self._round = 0

    def __repr__(self) -> str:
        return f"CKKSAggregator(preset={self.preset.name!r}, fingerprint={self.fingerprint[:16]})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("CKKSAggregator holds the CKKS secret key and cannot be pickled")

    def close(self) -> None:
        """Stop the encryption worker processes, if any (idempotent; a later round restarts them)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> CKKSAggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def aggregate(
        self,
        updates: Updates,
        weights: Mapping[str, float] | None = None,
        *,
        dropped: Iterable[str] = (),
    ) -> AggregationResult:
        """Weighted mean of the updates of all sites not in ``dropped``, computed under CKKS.

        Sites in ``dropped`` send nothing; the others' weights are renormalised. The report has the
        keys of :class:`~secure_fl.aggregators.base.AggregationReport` (those of SecAgg, such as
        ``threshold`` and ``bits``, are None); the ones that apply here are ``aggregator``, ``included``, ``dropped``, ``clipped`` (site -> 0: nothing is clipped per
        value), ``clipped_total``, ``clipped_updates`` (L2), ``bytes_sent`` (site -> frame bytes,
        0 for dropped sites), ``server_bytes_sent`` (the sum frames), ``site_seconds`` (encryption),
        ``server_seconds`` (checks, additions and serialising the sums), ``decrypt_seconds``, ``seconds`` (wall time of
        the whole call), ``expansion`` (bytes per included site / float32 bytes of the update),
        ``preset``, ``poly_modulus_degree``, ``coeff_mod_bit_sizes``, ``scale_bits``, ``max_abs``,
        ``ciphertexts`` (per site), ``chunks``, ``chunk_ciphertexts``, ``peak_pending_chunks``,
        ``fingerprint``, ``round``, ``max_error`` and ``max_rel_error`` (measured against the
        float64 plaintext mean; NaN when ``measure_error`` is off).
        """
        start = time.perf_counter()
        prepared = prepare(updates, weights, dropped)
        survivors = list(prepared.survivors)
        require_two_contributors(len(survivors))  # before a round id is spent
        round_id = self._round
        self._round += 1
        size = prepared.spec.size
        if size and self.workers > 1 and self._pool is None:
            self._pool = EncryptionPool(self._secret, self.workers)
        mean, stats, clipped_updates = run_ckks_local(
            self._secret,
            self._public,
            {s: prepared.vectors[s] for s in survivors},
            prepared.weights,
            survivors,
            round_id=round_id,
            chunk_ciphertexts=self.chunk_ciphertexts,
            l2_clip_norm=self.l2_clip,
            reference=self.measure_error,
            pool=self._pool,
        )
        sent = [stats.bytes_sent[s] for s in survivors]
        preset = self.preset
        report = AggregationReport(
            aggregator=self.name,
            included=survivors,
            dropped=sorted(prepared.dropped),
            clipped=dict.fromkeys(prepared.sites, 0),
            clipped_total=0,
            clipped_updates=clipped_updates,
            bytes_sent={s: stats.bytes_sent.get(s, 0) for s in prepared.sites},
            server_bytes_sent=stats.server_bytes_sent,
            site_seconds={s: stats.site_seconds.get(s, 0.0) for s in prepared.sites},
            server_seconds=stats.server_seconds,
            decrypt_seconds=stats.decrypt_seconds,
            expansion=(sum(sent) / len(sent)) / (4 * size) if size else 0.0,
            preset=preset.name,
            poly_modulus_degree=preset.poly_modulus_degree,
            coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes),
            scale_bits=preset.scale_bits,
            max_abs=preset.max_abs,
            ciphertexts=stats.ciphertexts,
            chunks=stats.chunks,
            chunk_ciphertexts=self.chunk_ciphertexts,
            peak_pending_chunks=stats.peak_pending_chunks,
            fingerprint=self.fingerprint,
            round=round_id,
            workers=self.workers,
            max_error=stats.max_error,
            max_rel_error=stats.max_rel_error,
            seconds=time.perf_counter() - start,
        )
        return AggregationResult(unflatten(mean, prepared.spec), report.as_dict())
