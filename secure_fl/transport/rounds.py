"""Transport helpers around the round layer: the initial model, per-party randomness, digests and
applying a mean to the model. The round recipe itself (plan, encoding, SecAgg configuration) is
:mod:`secure_fl.rounds` (:func:`secure_fl.rounds.plan_round`, the round halves); ``own_weight``
and ``vector_sha256`` are re-exported from there under their historical names.

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
from collections.abc import Mapping

import numpy as np

from secure_fl.crypto import DeterministicRandom, RandomBytes
from secure_fl.errors import InvalidUpdateError
from secure_fl.rounds.checks import own_weight
from secure_fl.rounds.secagg import vector_sha256
from secure_fl.transport.config import ModelSpec
from secure_fl.transport.tensors import Tensors, loads


def initial_model(spec: ModelSpec) -> Tensors:
    """The initial global model: the tensors file ``spec.path``, or float32 zeros of
    ``spec.shapes`` named ``p0, p1, ...``. Errors: ConfigError / InvalidUpdateError."""
    if spec.path is not None:
        return loads(spec.path.read_bytes())
    return {f"p{i}": np.zeros(shape, dtype=np.float32) for i, shape in enumerate(spec.shapes)}


def model_size(model: Mapping[str, np.ndarray]) -> int:
    """The number of values in ``model`` (the flat vector length of a round)."""
    return sum(int(v.size) for v in model.values())


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    """The SHA-256 digest of ``data`` (model and payload digests)."""
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


__all__ = [
    "apply_mean",
    "encoding_rng",
    "initial_model",
    "model_size",
    "own_weight",
    "sha256",
    "site_randbytes",
    "vector_sha256",
]
