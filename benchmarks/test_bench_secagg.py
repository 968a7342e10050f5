"""Secure aggregation cost against the plain sum, measured in one run (pytest-benchmark).

Run: ``make bench`` (or ``.venv/bin/python -m pytest benchmarks -m '' --benchmark-only``).

Model sizes are those of MONAI's 3D UNet with channels (16, 32, 64, 128) (about 1.2 M parameters)
and (16, 32, 64, 128, 256) (about 4.8 M). Inputs are already encoded (uint32) so that the protocol
itself is measured; ``test_aggregator_*`` measures the whole aggregator (encoding included).

The speed targets (a whole round against Flower's SecAgg+ mask generation, a site's masking
against its keystream floor) are the groups ``secagg round vs Flower masks`` and ``one site's
masking``; ``test_speed_table`` measures them all once more, interleaved, and prints the table
(also ``python benchmarks/secagg_speed.py``). No test here asserts a time.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from secagg_speed import (
    PARAMS,
    SITES,
    flower_masks,
    format_table,
    masks_in_round,
    measure,
    secagg_round,
    site_masking,
)

from secure_fl import aggregators
from secure_fl.crypto import MaskPRG
from secure_fl.crypto.parallel import mask_threads
from secure_fl.secagg import Phase, make_config, run_round

SIZES = {"1.2M": 1_200_000, "4.8M": 4_800_000}
pytestmark = pytest.mark.slow


def _inputs(n: int, size: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i: rng.integers(0, 2**32, size=size, dtype=np.uint32) for i in range(1, n + 1)}


def _mask_floor(size: int, masks: int) -> float:
    """Seconds to generate the keystream of ``masks`` masks into scratch buffers (best of 3),
    measured now, in the same run as the benchmark it is compared with."""
    prg = MaskPRG(size, 32)
    seeds = [i.to_bytes(32, "little") for i in range(masks)]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        prg.discard(seeds)
        best = min(best, time.perf_counter() - start)
    return best


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
        masks=masks_in_round(n, k, len(gone)),
    )


ROUND_GROUP = f"secagg round vs Flower masks ({SITES} sites, {PARAMS:,}, k=9, 110 masks)"
SITE_GROUP = f"one site's masking ({PARAMS:,}, k+1=10 masks)"


def test_flower_masks_for_a_round_baseline(benchmark) -> None:
    """Flower 1.4x's SecAgg+ mask generation (pseudo_rand_gen over the UNet's tensors) for the
    masks of the same round, without adding them."""
    masks = masks_in_round(SITES, SITES - 1, 0)
    benchmark.group = ROUND_GROUP
    benchmark.name = f"Flower 1.4x pseudo_rand_gen, {masks} masks (baseline)"
    benchmark.pedantic(flower_masks(masks), rounds=3, iterations=1)
    benchmark.extra_info["masks"] = masks


@pytest.mark.parametrize("active", [False, True])
def test_round_against_flower_masks(benchmark, active: bool) -> None:
    """A whole SecAgg round (10 sites x 4,806,481, complete graph, all parties' work)."""
    benchmark.group = ROUND_GROUP
    benchmark.name = f"secagg round, {'active' if active else 'semi-honest'}, all parties"
    result = benchmark.pedantic(secagg_round(active=active), rounds=5, iterations=1)
    benchmark.extra_info.update(
        site_ms=round(1e3 * float(np.mean([c.seconds for c in result.clients.values()])), 1),
        server_ms=round(1e3 * result.server.seconds, 1),
        threads=mask_threads(),
    )


@pytest.mark.parametrize("what", ["floor", "masking", "previous", "previous floor"])
def test_site_masking(benchmark, what: str) -> None:
    """One site's k+1 masks: generate-and-add onto its input, against the same keystream into a
    scratch buffer (the floor), and against the previous whole-vector passes."""
    masking, floor, previous, previous_floor = site_masking(SITES)
    call, name = {
        "floor": (floor, "keystream floor, same masks into scratch (baseline)"),
        "masking": (masking, "masking: chunked generate-and-add, threads"),
        "previous": (previous, "previous: whole-vector AES-CTR passes, one thread"),
        "previous floor": (previous_floor, "previous floor: AES-CTR keystream, one thread"),
    }[what]
    benchmark.group = SITE_GROUP
    benchmark.name = name
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=1)
    benchmark.extra_info["threads"] = mask_threads()


def test_speed_table(benchmark, capsys) -> None:
    """Both groups above measured once more in one interleaved pass; prints the table."""
    benchmark.group = "speed table (interleaved, best of 3)"
    benchmark.name = "secagg_speed.measure()"
    rows = benchmark.pedantic(measure, rounds=1, iterations=1)
    for row in rows:
        benchmark.extra_info[row.name] = f"{row.seconds * 1e3:.1f} ms, {row.ratio:.2f}x"
    with capsys.disabled():
        print("\n" + format_table(rows))


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
