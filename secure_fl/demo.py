"""The secure-aggregation demo: ten sites, one drops out after the key exchange, the exact sum.

Until the federated-training issue lands, this is what ``secure-fl demo`` and ``make demo`` run.
It drives the round layer (:mod:`secure_fl.rounds`) in process, as every other driver does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from secure_fl.aggregators import create
from secure_fl.encoding import flatten
from secure_fl.secagg import Phase


def _fake_unet_update(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    """An update shaped like a small 3D-UNet's parameters (conv kernels and biases)."""
    shapes = {
        "down1.conv.weight": (16, 1, 3, 3, 3),
        "down1.conv.bias": (16,),
        "down2.conv.weight": (32, 16, 3, 3, 3),
        "down2.conv.bias": (32,),
        "bottom.conv.weight": (64, 32, 3, 3, 3),
        "bottom.conv.bias": (64,),
        "up2.conv.weight": (32, 64, 3, 3, 3),
        "up1.conv.weight": (16, 32, 3, 3, 3),
        "out.conv.weight": (1, 16, 1, 1, 1),
    }
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def run_demo(
    *,
    sites: int = 10,
    protocol: str = "secagg+",
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> bool:
    """Run the demo and print what each party sees. Returns True when every check passed."""
    rng = np.random.default_rng(seed)
    names = [f"hospital-{i:02d}" for i in range(1, sites + 1)]
    updates = {name: _fake_unet_update(rng, 0.01) for name in names}
    weights = {name: float(rng.integers(20, 200)) for name in names}
    gone = names[sites // 2 + 1]
    survivors = [n for n in names if n != gone]
    size = flatten(updates[names[0]])[0].size
    echo(f"secure_fl demo: {sites} sites, {size:,} parameters each, protocol {protocol}")
    echo(f"site {gone} drops out after the key exchange, before sending its masked input\n")

    # 1. The round layer in the integer domain (what a deployment runs): the sum is exact.
    from secure_fl.crypto import SigningKey
    from secure_fl.rounds import AggregationSpec, plan_round, run_local

    ids = {n: i + 1 for i, n in enumerate(names)}
    keys = {ids[n]: SigningKey.generate() for n in names}
    plan = plan_round(
        AggregationSpec(protocol, dropout_rate=0.1),
        {ids[n]: weights[n] for n in names},
        vector_length=size,
        round_id=0,
        verify_keys={i: k.public_bytes for i, k in keys.items()},
    )
    codec = plan.codec
    config = plan.secagg
    if codec is None or config is None or plan.bit_plan is None:
        raise RuntimeError(f"{protocol!r} is not a secure-aggregation protocol")
    vectors = {ids[n]: flatten(updates[n])[0] for n in names}
    start = time.perf_counter()
    outcome = run_local(
        plan,
        vectors,
        dropouts={ids[gone]: Phase.MASKED_INPUT},
        signing_keys=keys,
        rng={i: np.random.default_rng([seed, i]) for i in ids.values()},
    )
    elapsed = time.perf_counter() - start
    # Independent check: each survivor's encoding, redone with the same stochastic rounding.
    expected = np.zeros(size, dtype=codec.dtype)
    for n in survivors:
        i = ids[n]
        weight = plan.normalised[i]
        expected += codec.encode(
            vectors[i], weight=weight, rng=np.random.default_rng([seed, i])
        ).values
    exact = outcome.total is not None and bool(np.array_equal(outcome.total, expected))
    k = config.degree
    echo(
        f"protocol: threshold {config.threshold} of {k + 1} share holders, k={k} neighbours, "
        f"{plan.bit_plan.bits}-bit ring, scale 2^{plan.bit_plan.frac_bits}"
    )
    echo(
        f"server recovered the sum of {len(outcome.survivors)} survivors in {elapsed:.2f} s; "
        f"masks of {sorted(outcome.dropped)} removed through Shamir shares"
    )
    echo(f"integer sum equals the plaintext sum of the survivors exactly: {exact}")

    # 2. What a pipeline sees: the weighted mean through the aggregator interface.
    secure = create(protocol, dropout_rate=0.1).aggregate(updates, weights, dropped=[gone])
    plain = create("plain").aggregate(updates, weights, dropped=[gone])
    err = max(
        float(np.max(np.abs(secure.mean[key].astype(np.float64) - plain.mean[key])))
        for key in plain.mean
    )
    bound = secure.report["max_error"]
    within = err <= bound + 1e-7  # + float32 rounding of the returned mean
    rep = secure.report
    echo(
        f"weighted mean over {len(rep['included'])} sites: max |secure - plain| = {err:.2e} "
        f"(bound {bound:.2e}, float32 output): {'ok' if within else 'FAILED'}"
    )
    per_site = np.mean([rep["bytes_sent"][s] for s in survivors])
    echo(
        f"bytes sent per site: {per_site / 1e6:.2f} MB secure vs {4 * size / 1e6:.2f} MB plain; "
        f"values clipped: {rep['clipped_total']}"
    )
    echo(
        f"aggregation time: {rep['seconds']:.2f} s secure vs {plain.report['seconds']:.3f} s plain"
    )
    ok = exact and within and rep["dropped"] == [gone]
    echo("\nall checks passed" if ok else "\nCHECKS FAILED")
    return ok
