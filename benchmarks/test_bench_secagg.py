"""Secure aggregation cost against the plain sum, measured in one run (pytest-benchmark).

Run: ``make bench`` (or ``.venv/bin/python -m pytest benchmarks -m '' --benchmark-only``).

Model sizes are those of MONAI's 3D UNet with channels (16, 32, 64, 128) (about 1.2 M parameters)
and (16, 32, 64, 128, 256) (about 4.8 M). Inputs are already encoded (uint32) so that the protocol
itself is measured; ``test_aggregator_*`` measures the whole aggregator (encoding included).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from secure_fl import aggregators
from secure_fl.crypto import MaskPRG
from secure_fl.secagg import Phase, make_config, run_round

SIZES = {"1.2M": 1_200_000, "4.8M": 4_800_000}
pytestmark = pytest.mark.slow


def _inputs(n: int, size: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i: rng.integers(0, 2**32, size=size, dtype=np.uint32) for i in range(1, n + 1)}


def _mt_mask(seed: bytes, size: int) -> np.ndarray:
    """A mask drawn the way a widely used Python SecAgg+ implementation draws it: the 32-byte seed
    folded to 32 bits, then NumPy's global Mersenne Twister. Brute-forceable (2**32 seeds); here
    only as the speed baseline the issue names."""
    seed32 = 0
    for i in range(0, len(seed), 4):
        seed32 ^= int.from_bytes(seed[i : i + 4], "little")
    np.random.seed(seed32)
    return np.random.randint(0, 2**32 - 1, size)


def _mask_floor(size: int, masks: int) -> float:
    """Seconds to generate and add ``masks`` AES-CTR masks into a preallocated buffer (best of 3),
    measured now, in the same run as the benchmark it is compared with."""
    prg = MaskPRG(size, 32)
    acc = np.zeros(size, dtype=np.uint32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(masks):
            prg.add_into(acc, i.to_bytes(32, "little"), 1)
        best = min(best, time.perf_counter() - start)
    return best


def _masks_in_round(n: int, k: int, dropped: int) -> int:
    """Mask vectors generated in one round: each site k pairwise + 1 self; the server regenerates
    each survivor's self mask and each dropped site's masks with its surviving neighbours."""
    survivors = n - dropped
    return survivors * (k + 1) + survivors + dropped * k


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("n", [10, 100])
def test_plain_sum_baseline(benchmark, n: int, size_name: str) -> None:
    size = SIZES[size_name]
    inputs = _inputs(n, size)
    benchmark.group = f"round n={n} {size_name}"
    benchmark.name = "plain modular sum (baseline)"

    def plain() -> np.ndarray:
        total = np.zeros(size, dtype=np.uint32)
        for v in inputs.values():
            np.add(total, v, out=total)
        return total

    benchmark.pedantic(plain, rounds=5, iterations=1)
    benchmark.extra_info["bytes_per_site"] = 4 * size


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("n", [10, 100])
def test_secure_round(benchmark, n: int, size_name: str, protocol: str, dropout: float) -> None:
    size = SIZES[size_name]
    inputs = _inputs(n, size)
    # Tolerate 10 % dropouts, no corrupt sites (semi-honest): SecAgg+ then picks k=46, t=24 at
    # n=100. With corrupt_fraction=0.1 it would need the complete graph at n=100 (see README).
    config = make_config(
        list(inputs),
        vector_length=size,
        bits=32,
        protocol=protocol,
        dropout_rate=0.1,
        corrupt_fraction=0.0,
    )
    gone = {i: Phase.MASKED_INPUT for i in range(1, int(n * dropout) + 1)}
    benchmark.group = f"round n={n} {size_name}"
    benchmark.name = f"{protocol} dropout={int(dropout * 100)}%"
    rounds = 3 if n == 10 else 1
    result = benchmark.pedantic(
        lambda: run_round(config, inputs, dropouts=gone), rounds=rounds, iterations=1
    )
    live = [s for s in result.clients if s not in gone]
    k = config.degree
    site_s = float(np.mean([result.clients[s].seconds for s in live]))
    benchmark.extra_info.update(
        site_vs_floor=round(site_s / _mask_floor(size, k + 1), 2),
        k=k,
        threshold=config.threshold,
        site_ms=round(1e3 * float(np.mean([result.clients[s].seconds for s in live])), 1),
        server_ms=round(1e3 * result.server.seconds, 1),
        site_MB=round(float(np.mean([result.clients[s].bytes_sent for s in live])) / 1e6, 2),
        server_MB=round(result.server.bytes_sent / 1e6, 2),
        masks=_masks_in_round(n, k, len(gone)),
    )


def test_mask_generation_floor(benchmark) -> None:
    """The floor: AES-256-CTR keystream into a preallocated buffer, plus the modular add."""
    size = SIZES["4.8M"]
    prg = MaskPRG(size, 32)
    acc = np.zeros(size, dtype=np.uint32)
    benchmark.group = "one 4.8M mask"
    benchmark.name = "AES-256-CTR mask, generate and add"
    benchmark.pedantic(lambda: prg.add_into(acc, b"\x01" * 32, 1), rounds=20, iterations=1)


def test_mt_mask_baseline(benchmark) -> None:
    size = SIZES["4.8M"]
    benchmark.group = "one 4.8M mask"
    benchmark.name = "MT19937 32-bit-seeded mask (baseline)"
    benchmark.pedantic(lambda: _mt_mask(b"\x01" * 32, size), rounds=10, iterations=1)


def test_round_against_mt_masks(benchmark) -> None:
    """A whole SecAgg round (10 sites, 4.8 M, all parties' work) against the MT implementation's
    mask generation alone for the same number of masks."""
    size = SIZES["4.8M"]
    inputs = _inputs(10, size)
    config = make_config(
        list(inputs), vector_length=size, bits=32, dropout_rate=0.1, corrupt_fraction=0.0
    )
    masks = _masks_in_round(10, 9, 0)
    benchmark.group = "secagg round vs MT masks (10 sites, 4.8M)"
    benchmark.name = "secagg round, all parties"
    benchmark.pedantic(lambda: run_round(config, inputs), rounds=3, iterations=1)
    benchmark.extra_info["masks"] = masks


def test_mt_masks_kept_per_site(benchmark) -> None:
    """The same MT masks, each site keeping its k+1 masks until it has added them (fresh memory
    for every mask, as an implementation that materialises its masks pays)."""
    size = SIZES["4.8M"]
    benchmark.group = "secagg round vs MT masks (10 sites, 4.8M)"
    benchmark.name = "MT mask generation, masks kept per site"

    def generate() -> None:
        for site in range(10):
            server_extra = 1 if site == 0 else 0  # the server regenerates 10 self masks
            masks = [
                _mt_mask((site * 100 + j).to_bytes(32, "little"), size)
                for j in range(10 + server_extra * 10)
            ]
            del masks

    benchmark.pedantic(generate, rounds=1, iterations=1)
    benchmark.extra_info["masks"] = _masks_in_round(10, 9, 0)


def test_mt_masks_for_a_round_baseline(benchmark) -> None:
    size = SIZES["4.8M"]
    masks = _masks_in_round(10, 9, 0)
    benchmark.group = "secagg round vs MT masks (10 sites, 4.8M)"
    benchmark.name = "MT mask generation alone (baseline)"

    def generate() -> None:
        for i in range(masks):
            _mt_mask(i.to_bytes(32, "little"), size)

    benchmark.pedantic(generate, rounds=1, iterations=1)
    benchmark.extra_info["masks"] = masks


@pytest.mark.parametrize("name", ["plain (baseline)", "secagg", "secagg+"])
def test_aggregator_float_updates(benchmark, name: str) -> None:
    """The whole aggregator on float32 updates (flatten, clip, encode, protocol, decode)."""
    rng = np.random.default_rng(1)
    size = SIZES["4.8M"]
    updates = {
        f"site-{i}": [(0.01 * rng.standard_normal(size)).astype(np.float32)] for i in range(10)
    }
    agg = aggregators.create(name.split()[0])
    benchmark.group = "aggregator, 10 sites, 4.8M float32"
    benchmark.name = f"aggregate {name}"
    result = benchmark.pedantic(lambda: agg.aggregate(updates), rounds=3, iterations=1)
    benchmark.extra_info["max_error"] = f"{result.report['max_error']:.1e}"
