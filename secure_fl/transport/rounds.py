"""Round logic shared by the server, the sites and the in-process reference: the initial model,
the encoding plan, the secure-aggregation configuration, per-party randomness and model updates.

Randomness: by default every random choice comes from the OS CSPRNG (the server makes none that
protect anything: a sparse SecAgg+ graph comes from the sites' committed nonces). With an
``insecure_test_seed`` each party's randomness is a :class:`DeterministicRandom` stream (or a
NumPy generator for stochastic rounding) derived from the seed, the party and the round, so that
the network round and :func:`secure_fl.transport.simulation.simulate_round` encode bit-identical
inputs. Anyone who knows the seed can recompute the masks: tests and benchmarks only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from secure_fl.crypto import DeterministicRandom, RandomBytes
from secure_fl.encoding import BitPlan, FixedPointCodec, flatten, plan_bit_width
from secure_fl.errors import InvalidUpdateError, PolicyError
from secure_fl.secagg import SecAggConfig, make_config
from secure_fl.transport.config import AggregationSettings, ModelSpec
from secure_fl.transport.tensors import Tensors, loads, same_structure


def initial_model(spec: ModelSpec) -> Tensors:
    """The initial global model: the tensors file ``spec.path``, or float32 zeros of
    ``spec.shapes`` named ``p0, p1, ...``. Errors: ConfigError / InvalidUpdateError."""
    if spec.path is not None:
        return loads(spec.path.read_bytes())
    return {f"p{i}": np.zeros(shape, dtype=np.float32) for i, shape in enumerate(spec.shapes)}


def model_size(model: Mapping[str, np.ndarray]) -> int:
    return sum(int(v.size) for v in model.values())


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def site_randbytes(test_seed: int | None, site_id: int, round_id: int) -> RandomBytes:
    """A site's protocol randomness (keys, shares, self-mask seed) for round ``round_id``."""
    if test_seed is None:
        return os.urandom
    return DeterministicRandom(
        f"secure_fl/transport/test/{test_seed}/site/{site_id}/{round_id}".encode()
    )


def encoding_rng(test_seed: int | None, site_id: int, round_id: int) -> np.random.Generator:
    """The generator of a site's stochastic rounding in round ``round_id``."""
    if test_seed is None:
        return np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
    return np.random.default_rng([test_seed, site_id, round_id, 0x5EC0DE])


def plan_round(settings: AggregationSettings, weights: Sequence[float]) -> BitPlan:
    """The fixed-point plan for one round: ``weights`` of the participants in id order.
    Errors: ConfigError when no bit width can hold the sum."""
    return plan_bit_width(
        num_sites=len(weights),
        weights=list(weights),
        clip_range=settings.clip_range,
        precision=settings.precision,
        bits=settings.bits,
    )


def round_config(
    settings: AggregationSettings,
    site_ids: Sequence[int],
    *,
    vector_length: int,
    bits: int,
    round_id: int,
    verify_keys: Mapping[int, bytes] | None = None,
    binding: bytes = b"",
) -> SecAggConfig:
    """The SecAggConfig of one round among ``site_ids`` (the server proposes it; every site
    checks it against its own policy, and a sparse SecAgg+ graph is derived by the sites in the
    round, not chosen here). ``binding``: :func:`secure_fl.transport.convert.setup_binding` of
    the participants' weights and the codec. Errors: ConfigError."""
    return make_config(
        list(site_ids),
        vector_length=vector_length,
        bits=bits,
        protocol=settings.protocol,
        round_id=round_id,
        threshold=settings.threshold,
        k=settings.k,
        dropout_rate=settings.dropout_rate,
        corrupt_fraction=settings.corrupt_fraction,
        active=settings.active,
        verify_keys=verify_keys if settings.active else None,
        binding=binding,
    )


def own_weight(
    listed: Mapping[int, float], site_id: int, reported: float, announced: float
) -> float:
    """A site's normalised weight, computed by the site itself from the setup's weights list.

    ``listed`` are every participant's weights as the server lists them, ``reported`` what this
    site reported in UpdateReady and ``announced`` the normalised weight the server sent. The
    result is ``listed[site_id] / sum(listed)`` normalised exactly as
    :func:`secure_fl.encoding.plan_bit_width` does, so it is bit-identical to the server's plan.
    This (with the weights list bound into the round's keys, see ``SecAggConfig.binding``) stops
    a server from scaling this site's update up and the others' down to isolate it in the sum.

    Errors: PolicyError (before anything is sent) when this site is not listed, its listed weight
    differs from the one it reported, the result underflows to 0, or ``announced`` differs from
    it by more than 1e-12 relative.
    """
    if site_id not in listed:
        raise PolicyError("the setup lists no weight for this site")
    if listed[site_id] != float(reported):
        raise PolicyError(
            f"the setup lists this site's weight as {listed[site_id]!r}, it reported {reported!r}"
        )
    exact = [Fraction(listed[s]) for s in sorted(listed)]
    norm = float(Fraction(listed[site_id]) / sum(exact, Fraction(0)))
    if norm <= 0.0:
        raise PolicyError("this site's normalised weight underflows to 0")
    if abs(float(announced) - norm) > 1e-12 * norm:
        raise PolicyError(
            f"the setup's weight {announced!r} is not this site's share of the listed weights "
            f"({norm!r})"
        )
    return norm


def encode_update(
    update: Mapping[str, np.ndarray],
    model: Mapping[str, np.ndarray],
    codec: FixedPointCodec,
    weight: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """Flatten ``update`` and encode ``weight * clip(update)``; returns (values, clipped count).
    Errors: InvalidUpdateError when the update does not match the model's structure."""
    if not same_structure(update, model):
        raise InvalidUpdateError("update does not match the model's names, shapes and dtypes")
    vector, _ = flatten(dict(update))
    encoded = codec.encode(vector, weight=weight, rng=rng)
    return encoded.values, encoded.clipped


def apply_mean(model: Mapping[str, np.ndarray], mean: np.ndarray) -> Tensors:
    """``model + mean`` (``mean`` flattened in the model's order), in the model's dtypes."""
    out: Tensors = {}
    offset = 0
    for name, value in model.items():
        part = mean[offset : offset + value.size].reshape(value.shape)
        out[name] = (value.astype(np.float64) + part).astype(value.dtype)
        offset += value.size
    if offset != mean.size:
        raise InvalidUpdateError(f"mean has {mean.size} values, the model {offset}")
    return out


def weighted_mean(
    updates: Mapping[int, Mapping[str, np.ndarray]], weights: Mapping[int, float]
) -> Any:
    """The plain weighted mean of flattened updates (the insecure baseline), float64."""
    total = sum(weights[s] for s in updates)
    acc: np.ndarray | None = None
    for site in sorted(updates):
        vector, _ = flatten(dict(updates[site]))
        term = vector * (weights[site] / total)
        acc = term if acc is None else acc + term
    return acc


def vector_sha256(vector: np.ndarray) -> str:
    """SHA-256 (hex) of an unsigned vector's little-endian bytes: a digest of a modular sum that
    does not depend on the host's byte order."""
    little = vector.astype(vector.dtype.newbyteorder("<"), copy=False)
    return hashlib.sha256(np.ascontiguousarray(little).tobytes()).hexdigest()
