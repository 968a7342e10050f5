"""CKKS presets: the HE Standard's 128-bit limits, the no-overflow bound, lookup by name."""

from __future__ import annotations

import dataclasses

import pytest
import tenseal as ts

from secure_fl.errors import ConfigError
from secure_fl.he import (
    DEFAULT_PRESET,
    HE_STANDARD_128_MAX_BITS,
    PRESETS,
    CKKSPreset,
    get_preset,
)


def _preset(**changes: object) -> CKKSPreset:
    base = dict(
        name="t",
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(56, 60),
        scale_bits=45,
        max_abs=512.0,
    )
    base.update(changes)
    return CKKSPreset(**base)  # type: ignore[arg-type]


def test_default_preset_is_additions_only_two_primes_n8192() -> None:
    preset = get_preset()
    assert preset.name == DEFAULT_PRESET
    assert preset.poly_modulus_degree == 8192
    assert len(preset.coeff_mod_bit_sizes) == 2
    assert preset.slots == 4096
    assert preset.data_bits == preset.coeff_mod_bit_sizes[0]
    assert preset.total_bits <= HE_STANDARD_128_MAX_BITS[8192]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_meets_the_128_bit_limit_and_cannot_overflow(name: str) -> None:
    preset = PRESETS[name]
    assert preset.total_bits <= HE_STANDARD_128_MAX_BITS[preset.poly_modulus_degree]
    assert preset.max_abs * preset.scale <= 2.0 ** (preset.data_bits - 2)
    assert CKKSPreset.from_dict(preset.to_dict()) == preset
    # SEAL enforces the same table (sec_level tc128): the preset's context must be accepted
    ts.context(
        ts.SCHEME_TYPE.CKKS,
        preset.poly_modulus_degree,
        coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=1,
    )


@pytest.mark.parametrize(
    ("degree", "sizes"),
    [(8192, (60, 60, 60, 38)), (16384, (60, 60, 60, 60, 60, 60, 39, 39))],
)
def test_security_limit_is_exactly_the_he_standard_and_seals(degree: int, sizes: tuple) -> None:
    assert sum(sizes) == HE_STANDARD_128_MAX_BITS[degree]
    _preset(poly_modulus_degree=degree, coeff_mod_bit_sizes=sizes, scale_bits=40, max_abs=1.0)
    over = (*sizes[:-1], sizes[-1] + 1)
    with pytest.raises(ConfigError, match="HE Standard"):
        _preset(poly_modulus_degree=degree, coeff_mod_bit_sizes=over, scale_bits=40, max_abs=1.0)
    with pytest.raises(ValueError, match="not set correctly"):  # SEAL agrees: one bit too many
        ts.context(ts.SCHEME_TYPE.CKKS, degree, coeff_mod_bit_sizes=list(over), n_threads=1)


@pytest.mark.parametrize(
    "changes",
    [
        {"poly_modulus_degree": 8000},
        {"poly_modulus_degree": True},
        {"coeff_mod_bit_sizes": (56,)},
        {"coeff_mod_bit_sizes": [56, 60]},
        {"coeff_mod_bit_sizes": (61, 60)},
        {"coeff_mod_bit_sizes": (19, 60)},
        {"scale_bits": 56},
        {"scale_bits": 19},
        {"scale_bits": 45.0},
        {"max_abs": 0.0},
        {"max_abs": float("inf")},
        {"max_abs": float("nan")},
        {"max_abs": True},
        {"max_abs": 513.0},  # 513 * 2**45 > 2**54: a sum could overflow
        {"name": ""},
    ],
)
def test_invalid_presets_are_refused(changes: dict) -> None:
    with pytest.raises(ConfigError):
        _preset(**changes)


def test_bound_is_exactly_a_quarter_of_the_ciphertext_modulus() -> None:
    assert _preset(max_abs=512.0).max_abs == 512.0
    with pytest.raises(ConfigError, match="overflow"):
        _preset(max_abs=512.0 * (1 + 1e-9))


def test_get_preset_by_name_object_and_unknown() -> None:
    assert get_preset("n16384-add").slots == 8192
    custom = _preset()
    assert get_preset(custom) is custom
    with pytest.raises(ConfigError, match="unknown CKKS preset"):
        get_preset("n4096")
    with pytest.raises(ConfigError):
        get_preset(8192)  # type: ignore[arg-type]


def test_presets_are_frozen_and_from_dict_checks_keys() -> None:
    preset = get_preset()
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.max_abs = 1e9  # type: ignore[misc]
    data = preset.to_dict()
    data["extra"] = 1
    with pytest.raises(ConfigError):
        CKKSPreset.from_dict(data)
    data = preset.to_dict()
    data["coeff_mod_bit_sizes"] = [60, 60, 60, 60]  # 240 bits at N=8192
    with pytest.raises(ConfigError, match="HE Standard"):
        CKKSPreset.from_dict(data)
