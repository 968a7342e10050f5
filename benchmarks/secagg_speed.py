"""SecAgg speed against Flower's SecAgg+ mask generation, every figure measured in one process.

Run: ``.venv/bin/python benchmarks/secagg_speed.py`` (about a minute; no options) prints the table
below; ``benchmarks/test_bench_secagg.py`` runs the same measurements under pytest-benchmark.

* **Baseline**: Flower 1.4x's ``pseudo_rand_gen`` (``flwr.common.secure_aggregation.
  secaggplus_utils``) reimplemented faithfully in :func:`flower_pseudo_rand_gen`: the 32-byte seed
  XOR-folded to 32 bits seeds a ``numpy.random.RandomState`` (MT19937), then one ``randint(0,
  num_range - 1, shape)`` per model tensor, with Flower's default ``modulus_range`` 2**32. It is
  timed for the number of masks of the same round (each site 1 + k, the server 1 per survivor and
  k per dropped site), over the tensors of the 4,806,481-parameter MONAI 3D UNet
  (:data:`UNET_4_8M_SHAPES`). Flower then still has to add them; this baseline does not.
* **Round**: :func:`secure_fl.secagg.run_round`, 10 sites, complete graph, every party's work
  (encoded uint32 inputs), semi-honest and active variants.
* **Site masking** against its own **keystream floor**: the ``k + 1`` masks of one site generated
  and added onto its input (:meth:`MaskPRG.add_many_into`) against the same keystream generated
  into a scratch buffer and discarded (:meth:`MaskPRG.discard`), same chunks, same threads; and
  the previous method (whole-vector AES-CTR passes, one thread) with its own floor.

Each figure is the best of ``repeats`` calls, the calls of all rows interleaved, so that a burst of
load from another process hits every row alike (this machine is shared).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from secure_fl.crypto import MaskPRG, keystream
from secure_fl.crypto.parallel import mask_threads
from secure_fl.secagg import make_config, run_round

#: Float tensor shapes of MONAI ``UNet(spatial_dims=3, channels=(16, 32, 64, 128, 256),
#: strides=(2, 2, 2, 2), num_res_units=2, norm=INSTANCE)`` as built by
#: ``secure_fl.training.model.build_unet`` (``state_dict`` order): 4,806,481 parameters.
UNET_4_8M_SHAPES: tuple[tuple[int, ...], ...] = (
    (16, 1, 3, 3, 3), (16,), (1,), (16, 16, 3, 3, 3), (16,), (1,), (16, 1, 3, 3, 3), (16,),
    (32, 16, 3, 3, 3), (32,), (1,), (32, 32, 3, 3, 3), (32,), (1,), (32, 16, 3, 3, 3), (32,),
    (64, 32, 3, 3, 3), (64,), (1,), (64, 64, 3, 3, 3), (64,), (1,), (64, 32, 3, 3, 3), (64,),
    (128, 64, 3, 3, 3), (128,), (1,), (128, 128, 3, 3, 3), (128,), (1,), (128, 64, 3, 3, 3),
    (128,), (256, 128, 3, 3, 3), (256,), (1,), (256, 256, 3, 3, 3), (256,), (1,),
    (256, 128, 1, 1, 1), (256,), (384, 64, 3, 3, 3), (64,), (1,), (64, 64, 3, 3, 3), (64,),
    (1,), (128, 32, 3, 3, 3), (32,), (1,), (32, 32, 3, 3, 3), (32,), (1,), (64, 16, 3, 3, 3),
    (16,), (1,), (16, 16, 3, 3, 3), (16,), (1,), (32, 2, 3, 3, 3), (2,), (1,), (2, 2, 3, 3, 3),
    (2,),
)  # fmt: skip
PARAMS = sum(math.prod(shape) for shape in UNET_4_8M_SHAPES)
SITES = 10
FLOWER_MODULUS_RANGE = 1 << 32  # SecAggPlusWorkflow's default modulus_range

if PARAMS != 4_806_481:  # pragma: no cover - a typo in the table above
    raise RuntimeError(f"UNET_4_8M_SHAPES holds {PARAMS} parameters, not 4,806,481")


def flower_pseudo_rand_gen(
    seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """Flower's mask generator, same steps and same output: 32-bit XOR fold of the seed,
    ``RandomState(seed32)``, one ``randint(0, num_range - 1, dimension)`` per tensor (a 0-d
    array for an empty shape). Brute-forceable (2**32 seeds); a speed baseline only."""
    if len(seed) % 4:
        raise ValueError("seed length must be a multiple of 4")
    seed32 = 0
    for i in range(0, len(seed), 4):
        seed32 ^= int.from_bytes(seed[i : i + 4], "little")
    gen = np.random.RandomState(seed32)
    output: list[np.ndarray] = []
    for dimension in dimensions_list:
        if len(dimension) == 0:
            output.append(np.array(gen.randint(0, num_range - 1), dtype=int))
        else:
            output.append(gen.randint(0, num_range - 1, dimension))
    return output


def masks_in_round(n: int, k: int, dropped: int) -> int:
    """Mask vectors generated in one round: each surviving site ``k`` pairwise + 1 self; the
    server regenerates each survivor's self mask and each dropped site's ``k`` pairwise masks."""
    survivors = n - dropped
    return survivors * (k + 1) + survivors + dropped * k


def encoded_inputs(n: int, size: int) -> dict[int, np.ndarray]:
    """``n`` random encoded (uint32) inputs of ``size`` words, by site id 1..n (fixed seed)."""
    rng = np.random.default_rng(0)
    return {i: rng.integers(0, 2**32, size=size, dtype=np.uint32) for i in range(1, n + 1)}


def flower_masks(count: int) -> Callable[[], None]:
    """A call generating ``count`` Flower masks over the UNet's tensors (the baseline)."""

    def generate() -> None:
        for i in range(count):
            flower_pseudo_rand_gen(i.to_bytes(32, "little"), FLOWER_MODULUS_RANGE, UNET_4_8M_SHAPES)

    return generate


def secagg_round(*, active: bool) -> Callable[[], object]:
    """A call running one whole SecAgg round, 10 sites x 4,806,481, complete graph."""
    from secure_fl.crypto import SigningKey

    inputs = encoded_inputs(SITES, PARAMS)
    keys = {i: SigningKey.generate() for i in inputs} if active else None
    config = make_config(
        list(inputs),
        vector_length=PARAMS,
        bits=32,
        dropout_rate=0.1,
        corrupt_fraction=0.0,
        active=active,
        verify_keys={i: k.public_bytes for i, k in keys.items()} if keys else None,
    )
    return lambda: run_round(config, inputs, signing_keys=keys)


def site_masking(masks: int) -> tuple[Callable[[], None], ...]:
    """Four calls for one site's ``masks`` masks: generate-and-add onto its input (what
    ``SecAggClient`` does), the keystream floor of the same masks (same chunks and threads), the
    previous method (copy the input, then per mask one whole-vector AES-CTR keystream pass and
    one add pass, one thread) and that method's floor (the AES-CTR keystream alone, one thread)."""
    prg = MaskPRG(PARAMS, 32)
    seeds = [bytes([i + 1]) * 32 for i in range(masks)]
    terms = [(seed, 1 if i % 2 else -1) for i, seed in enumerate(seeds)]
    base = encoded_inputs(1, PARAMS)[1]
    out = np.empty_like(base)
    scratch = np.empty_like(base)
    raw = scratch.data.cast("B")

    def ctr(seed: bytes) -> None:
        encryptor = keystream.ctr_encryptor(seed, bytes(16))
        encryptor.update_into(keystream.zero_input(raw.nbytes), raw)

    def previous() -> None:
        acc = base.copy()
        for seed, sign in terms:
            ctr(seed)
            (np.add if sign == 1 else np.subtract)(acc, scratch, out=acc)

    def previous_floor() -> None:
        for seed in seeds:
            ctr(seed)

    return (
        lambda: prg.add_many_into(out, terms, base=base),
        lambda: prg.discard(seeds),
        previous,
        previous_floor,
    )


@dataclass(frozen=True)
class Row:
    """One measured line: ``seconds`` (best of the repeats) and its ratio to the group baseline."""

    group: str
    name: str
    seconds: float
    ratio: float  # baseline seconds / these seconds (how many times faster than the baseline)


def measure(repeats: int = 3) -> list[Row]:
    """Measure every row of the module docstring, interleaved, best of ``repeats`` each."""
    k = SITES - 1
    masks = masks_in_round(SITES, k, 0)
    masking, floor, previous, previous_floor = site_masking(k + 1)
    groups: dict[str, list[tuple[str, Callable[[], object]]]] = {
        f"round, {SITES} sites x {PARAMS:,} (k={k}, {masks} masks)": [
            (f"Flower 1.4x pseudo_rand_gen, {masks} masks (baseline)", flower_masks(masks)),
            ("secure_fl SecAgg round, semi-honest (run_round)", secagg_round(active=False)),
            ("secure_fl SecAgg round, active (run_round)", secagg_round(active=True)),
        ],
        f"one site's masking, {k + 1} masks x {PARAMS:,}": [
            ("keystream floor: same masks into scratch (baseline)", floor),
            ("masking: generate-and-add onto the input", masking),
            ("previous: whole-vector AES-CTR passes, one thread", previous),
            ("previous floor: AES-CTR keystream alone, one thread", previous_floor),
        ],
    }
    best: dict[str, float] = {}
    for _ in range(repeats):
        for rows in groups.values():
            for name, call in rows:
                start = time.perf_counter()
                call()
                best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    out: list[Row] = []
    for group, rows in groups.items():
        base = best[rows[0][0]]
        out.extend(Row(group, name, best[name], base / best[name]) for name, _ in rows)
    return out


def format_table(rows: Sequence[Row], repeats: int = 3) -> str:
    """The rows as a Markdown table (seconds and speed-up against the group's baseline)."""
    lines = [
        f"mask threads: {mask_threads()}",
        "",
        f"| group | measurement | best of {repeats} | vs baseline |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.group} | {row.name} | {row.seconds * 1e3:,.1f} ms | "
            + ("1x" if "baseline" in row.name else f"{row.ratio:.2f}x faster")
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(measure()))
