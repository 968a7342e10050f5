"""CKKS (TenSEAL) aggregation cost against the plain sum and masked SecAgg, measured in one run.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_ckks.py -m '' -p no:randomly
--benchmark-only --benchmark-columns=min,median,rounds`` (or ``make bench`` for every suite).

Model sizes are those of ``test_bench_secagg.py`` (MONAI 3D UNets of about 1.2 M and 4.8 M
parameters); ten sites. Per site: encrypting one update (in this process, and in two worker
processes), the server's checks and additions for ten sites, decrypting the sum; bytes per site and
the expansion (bytes sent / float32 bytes of the update) are in each line's extra info. Per round:
the whole ``ckks`` aggregator against the whole ``secagg`` aggregator and the plain weighted sum, on
the same float32 updates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from secure_fl import aggregators
from secure_fl.aggregators.ckks import CKKSAggregator
from secure_fl.he import (
    CiphertextSummer,
    Layout,
    SecretContext,
    SiteEncryptor,
    SumDecryptor,
)
from secure_fl.he.parallel import EncryptionPool

SIZES = {"1.2M": 1_200_000, "4.8M": 4_800_000}
SITES = 10
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate()


@pytest.fixture(scope="module")
def pool(secret: SecretContext):  # type: ignore[no-untyped-def]
    with EncryptionPool(secret, 2) as workers:
        yield workers


def _vector(size: int, seed: int = 0) -> np.ndarray:
    return 0.01 * np.random.default_rng(seed).standard_normal(size)


def _updates(size: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    return {
        f"site-{i}": [(0.01 * rng.standard_normal(size)).astype(np.float32)] for i in range(SITES)
    }


def _per_site(size: int, frames: list[bytes]) -> dict[str, Any]:
    sent = sum(len(f) for f in frames)
    return {"site_MB": round(sent / 1e6, 2), "expansion": round(sent / (4 * size), 3)}


# ----------------------------------------------------------------------------- per site


@pytest.mark.parametrize("size_name", list(SIZES))
def test_site_float32_bytes_baseline(benchmark, size_name: str) -> None:
    """What plain FedAvg does per site: turn the update into float32 bytes."""
    size = SIZES[size_name]
    vector = _vector(size)
    benchmark.group = f"ckks per site, {size_name}"
    benchmark.name = "float32 bytes of the update (plain, baseline)"
    blob = benchmark.pedantic(lambda: vector.astype(np.float32).tobytes(), rounds=5, iterations=1)
    benchmark.extra_info.update(site_MB=round(len(blob) / 1e6, 2), expansion=1.0)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("size_name", list(SIZES))
def test_site_encrypt(benchmark, secret, pool, size_name: str, workers: int) -> None:
    size = SIZES[size_name]
    vector = _vector(size)
    encryptor = SiteEncryptor(secret, Layout(size, secret.preset.slots))
    use = pool if workers == 2 else None
    benchmark.group = f"ckks per site, {size_name}"
    benchmark.name = f"ckks encrypt, {workers} worker{'s' if workers > 1 else ''}"
    frames = benchmark.pedantic(
        lambda: list(encryptor.stream(vector, factor=1 / SITES, round_id=0, pool=use)),
        rounds=3,
        iterations=1,
    )
    benchmark.extra_info.update(
        _per_site(size, frames),
        M_values_per_s=round(size / benchmark.stats.stats.median / 1e6, 2),
    )


@pytest.mark.parametrize("size_name", list(SIZES))
def test_server_add_and_site_decrypt(benchmark, secret, size_name: str) -> None:
    """The server's checks and additions for ten sites (one site's frames sent under ten names:
    the cost is the same), then one site's decryption of the sums."""
    size = SIZES[size_name]
    layout = Layout(size, secret.preset.slots)
    frames = list(SiteEncryptor(secret, layout).stream(_vector(size), factor=1 / SITES, round_id=0))
    public = secret.public()
    names = [f"site-{i}" for i in range(SITES)]

    def add() -> list[bytes]:
        summer = CiphertextSummer(public, layout, round_id=0)
        sums = []
        for chunk, frame in enumerate(frames):
            for name in names:
                summer.add(name, frame)
            sums.append(summer.pop(chunk))
        return sums

    benchmark.group = f"ckks per site, {size_name}"
    benchmark.name = f"ckks add, server, {SITES} sites"
    sums = benchmark.pedantic(add, rounds=3, iterations=1)
    benchmark.extra_info.update(
        per_site_ms=round(1e3 * benchmark.stats.stats.median / SITES, 1),
        server_MB=round(sum(len(s) for s in sums) / 1e6, 2),
    )


@pytest.mark.parametrize("size_name", list(SIZES))
def test_site_decrypt(benchmark, secret, size_name: str) -> None:
    size = SIZES[size_name]
    layout = Layout(size, secret.preset.slots)
    frames = list(SiteEncryptor(secret, layout).stream(_vector(size), factor=1.0, round_id=0))
    summer = CiphertextSummer(secret.public(), layout, round_id=0)
    sums = []
    for chunk, frame in enumerate(frames):
        summer.add("a", frame)
        sums.append(summer.pop(chunk))
    decryptor = SumDecryptor(secret, layout, round_id=0)
    benchmark.group = f"ckks per site, {size_name}"
    benchmark.name = "ckks decrypt the sum, one site"
    out = benchmark.pedantic(
        lambda: [decryptor.decrypt(s, chunk=c) for c, s in enumerate(sums)], rounds=3, iterations=1
    )
    benchmark.extra_info["max_error"] = f"{np.max(np.abs(np.concatenate(out) - _vector(size))):.1e}"


def test_site_encrypt_depth2_preset(benchmark) -> None:
    """TenSEAL's tutorial parameters (depth-2 modulus, 4 primes) with full slots, for comparison."""
    size = SIZES["1.2M"]
    deep = SecretContext.generate("n8192-depth2")
    encryptor = SiteEncryptor(deep, Layout(size, deep.preset.slots))
    vector = _vector(size)
    benchmark.group = "ckks per site, 1.2M"
    benchmark.name = "ckks encrypt, depth-2 preset (4 primes)"
    frames = benchmark.pedantic(
        lambda: list(encryptor.stream(vector, factor=1 / SITES, round_id=0)), rounds=1, iterations=1
    )
    benchmark.extra_info.update(_per_site(size, frames))


# ----------------------------------------------------------------------------- whole rounds


@pytest.mark.parametrize("size_name", list(SIZES))
def test_round_plain_sum_baseline(benchmark, size_name: str) -> None:
    updates = _updates(SIZES[size_name])
    agg = aggregators.create("plain")
    benchmark.group = f"aggregator, {SITES} sites, {size_name} float32"
    benchmark.name = "aggregate plain (baseline)"
    result = benchmark.pedantic(lambda: agg.aggregate(updates), rounds=3, iterations=1)
    benchmark.extra_info.update(expansion=1.0, max_error=result.report["max_error"])


@pytest.mark.parametrize("size_name", list(SIZES))
def test_round_secagg(benchmark, size_name: str) -> None:
    size = SIZES[size_name]
    updates = _updates(size)
    agg = aggregators.create("secagg")
    benchmark.group = f"aggregator, {SITES} sites, {size_name} float32"
    benchmark.name = "aggregate secagg"
    result = benchmark.pedantic(lambda: agg.aggregate(updates), rounds=1, iterations=1)
    report = result.report
    sent = float(np.mean(list(report["bytes_sent"].values())))
    benchmark.extra_info.update(
        site_ms=round(1e3 * float(np.mean(list(report["site_seconds"].values()))), 1),
        server_ms=round(1e3 * report["server_seconds"], 1),
        site_MB=round(sent / 1e6, 2),
        expansion=round(sent / (4 * size), 3),
        max_error=f"{report['max_error']:.1e}",
    )


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("size_name", list(SIZES))
def test_round_ckks(benchmark, secret, size_name: str, workers: int) -> None:
    size = SIZES[size_name]
    updates = _updates(size)
    agg = CKKSAggregator(secret=secret, workers=workers)
    if workers > 1:
        agg.aggregate({s: [np.zeros(1, np.float32)] for s in updates})  # start the workers
    benchmark.group = f"aggregator, {SITES} sites, {size_name} float32"
    benchmark.name = f"aggregate ckks, {workers} worker{'s' if workers > 1 else ''}"
    try:
        result = benchmark.pedantic(lambda: agg.aggregate(updates), rounds=1, iterations=1)
    finally:
        agg.close()
    report = result.report
    live = report["included"]
    benchmark.extra_info.update(
        site_ms=round(1e3 * float(np.mean([report["site_seconds"][s] for s in live])), 1),
        server_ms=round(1e3 * report["server_seconds"], 1),
        decrypt_ms=round(1e3 * report["decrypt_seconds"], 1),
        site_MB=round(float(np.mean([report["bytes_sent"][s] for s in live])) / 1e6, 2),
        expansion=round(report["expansion"], 3),
        max_error=f"{report['max_error']:.1e}",
        max_rel_error=f"{report['max_rel_error']:.1e}",
    )
