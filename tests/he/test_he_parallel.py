"""Encryption in worker processes: same frames semantics, errors come back, pools close."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from secure_fl.aggregators.ckks import CKKSAggregator
from secure_fl.errors import ConfigError, InvalidUpdateError
from secure_fl.he import CiphertextSummer, Layout, SecretContext, SiteEncryptor, SumDecryptor
from secure_fl.he.parallel import EncryptionPool


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate()


@pytest.fixture(scope="module")
def pool(secret: SecretContext):  # type: ignore[no-untyped-def]
    with EncryptionPool(secret, 2) as workers:
        yield workers


def test_pool_frames_decrypt_like_local_ones(secret: SecretContext, pool: EncryptionPool) -> None:
    layout = Layout(9000, 4096, 1)
    vector = 0.01 * np.random.default_rng(0).standard_normal(layout.size)
    enc = SiteEncryptor(secret, layout)
    frames = list(enc.stream(vector, factor=0.5, round_id=3, pool=pool))
    assert len(frames) == layout.chunks == 3
    dec = SumDecryptor(secret, layout, round_id=3)
    out = np.empty(layout.size)
    for chunk, frame in enumerate(frames):
        summer = CiphertextSummer(secret.public(), layout, round_id=3)
        summer.add("a", frame)
        start, stop = layout.chunk_range(chunk)
        out[start:stop] = dec.decrypt(summer.pop(chunk), chunk=chunk)
    np.testing.assert_allclose(out, 0.5 * vector, rtol=0, atol=1e-9)


def test_worker_errors_reach_the_caller(secret: SecretContext, pool: EncryptionPool) -> None:
    layout = Layout(100, 4096)
    future = pool.submit(layout, np.full(100, 1e6), chunk=0, factor=1.0, round_id=0)
    with pytest.raises(InvalidUpdateError):
        future.result()
    enc = SiteEncryptor(secret, layout)
    with pytest.raises(InvalidUpdateError):  # checked before anything is submitted
        next(enc.stream(np.full(100, np.nan), factor=1.0, round_id=0, pool=pool))


def test_pool_of_another_context_is_refused(pool: EncryptionPool) -> None:
    other = SecretContext.generate()
    enc = SiteEncryptor(other, Layout(10, 4096))
    with pytest.raises(ConfigError, match="not the federation's"):
        next(enc.stream(np.zeros(10), factor=1.0, round_id=0, pool=pool))


def test_pool_hygiene(secret: SecretContext) -> None:
    pool = EncryptionPool(secret, 1)
    assert "fingerprint=" in repr(pool)
    with pytest.raises(TypeError):
        pickle.dumps(pool)
    pool.close()
    pool.close()
    with pytest.raises(ConfigError, match="closed"):
        pool.submit(Layout(1, 4096), np.zeros(1), chunk=0, factor=1.0, round_id=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            EncryptionPool(secret, bad)  # type: ignore[arg-type]


def test_aggregator_with_two_workers(secret: SecretContext) -> None:
    rng = np.random.default_rng(1)
    updates = {f"s{i}": [(0.01 * rng.standard_normal(20_000)).astype(np.float32)] for i in range(4)}
    weights = {"s0": 1.0, "s1": 2.0, "s2": 3.0, "s3": 4.0}
    with CKKSAggregator(secret=secret, workers=2, chunk_ciphertexts=2) as agg:
        result = agg.aggregate(updates, weights, dropped=["s1"])
        again = agg.aggregate(updates, weights)
    assert agg._pool is None  # closed on exit
    assert result.report["workers"] == 2 and result.report["max_rel_error"] < 1e-6
    assert again.report["max_rel_error"] < 1e-6
    want = sum(weights[s] * updates[s][0].astype(np.float64) for s in ("s0", "s2", "s3")) / 8
    np.testing.assert_allclose(result.mean[0], want, rtol=0, atol=1e-7)
    assert result.report["bytes_sent"]["s1"] == 0
    assert all(result.report["site_seconds"][s] > 0 for s in ("s0", "s2", "s3"))
    with pytest.raises(ConfigError):
        CKKSAggregator(workers=0)
