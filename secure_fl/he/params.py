"""Named CKKS parameter presets, each checked against the 128-bit level of the HE Standard.

A preset fixes everything two parties must agree on before they can add each other's ciphertexts:
the ring degree ``N`` (``poly_modulus_degree``; a ciphertext holds ``N / 2`` real values), the bit
sizes of the coefficient-modulus primes, the scale ``2**scale_bits`` at which values are encoded,
and ``max_abs``, the largest magnitude a site may encrypt.

Aggregation needs additions only, so the default presets use two primes: the first is the only
prime of the ciphertext level (what is sent), the second is SEAL's special prime (key level only).
Ciphertexts are then ``2 * N`` words of the first prime, about 8 bytes per value before SEAL's zstd
compression, which packs the unused high bits of each word: a 56-bit first prime sends about 7.6
bytes per float32 parameter (expansion 7.6x).

Guarantees checked at construction (:class:`CKKSPreset`), all raising :class:`ConfigError`:

* ``poly_modulus_degree`` is a power of two in the HE Standard table and the total coefficient
  modulus (all primes, special prime included) is at most the 128-bit classical-security limit of
  the HE Standard (Albrecht et al. 2018, Table 1, ternary secrets): 218 bits at ``N = 8192``,
  438 bits at ``N = 16384``.
* every prime has 20 to 60 bits (SEAL's range);
* no overflow: ``max_abs * 2**scale_bits <= 2**(data_bits - 2)``, where ``data_bits`` is the size
  of the ciphertext-level modulus (all primes but the special one). A decrypted value is correct
  while ``|value| * 2**scale_bits + noise < q / 2``; the bound leaves at least ``q / 4`` for the
  noise, which is about ``2**10`` per fresh ciphertext and grows with the square root of the
  number of sites (about ``2**15`` for a thousand sites).

Sites scale their update by ``weight / total_weight`` before encrypting, so the encrypted sum of any
subset of sites is bounded by ``max_abs`` too: the bound does not depend on the number of sites.

Precision: the absolute error of one decrypted value is about
``sqrt(n_sites) * 2**11 / 2**scale_bits`` divided by the survivors' share of the total weight
(measured: ``1e-10`` for nine of ten sites at ``scale_bits = 45``), i.e. below ``1e-6`` relative
error whenever the largest value of the mean is above about ``1e-4``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from secure_fl.errors import ConfigError

#: The HE Standard's largest total coefficient-modulus bit count per ring degree at the 128-bit
#: classical security level (uniform ternary secret), as enforced by SEAL's ``sec_level_type::tc128``.
HE_STANDARD_128_MAX_BITS: Mapping[int, int] = MappingProxyType(
    {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
)

_MIN_PRIME_BITS = 20
_MAX_PRIME_BITS = 60


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CKKSPreset:
    """CKKS parameters for aggregation (see the module docstring for what is checked).

    ``coeff_mod_bit_sizes`` lists the prime sizes, the special prime last. ``scale_bits`` sets the
    encoding scale ``2**scale_bits``; ``max_abs`` bounds the magnitude of every value a site
    encrypts (larger values are refused, never clipped).

    Errors: ConfigError for any field of the wrong type or outside its range, and for parameters
    above the HE Standard's 128-bit limit or whose bound could overflow.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    max_abs: float
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"preset name must be a non-empty string, got {self.name!r}")
        n = self.poly_modulus_degree
        if not _is_int(n) or n not in HE_STANDARD_128_MAX_BITS:
            raise ConfigError(
                f"preset {self.name!r}: poly_modulus_degree must be one of "
                f"{sorted(HE_STANDARD_128_MAX_BITS)}, got {n!r}"
            )
        sizes = self.coeff_mod_bit_sizes
        if not isinstance(sizes, tuple) or len(sizes) < 2 or not all(_is_int(b) for b in sizes):
            raise ConfigError(
                f"preset {self.name!r}: coeff_mod_bit_sizes must be a tuple of >= 2 integers "
                f"(ciphertext primes, then the special prime), got {sizes!r}"
            )
        if not all(_MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS for b in sizes):
            raise ConfigError(
                f"preset {self.name!r}: every prime must have {_MIN_PRIME_BITS} to "
                f"{_MAX_PRIME_BITS} bits, got {sizes!r}"
            )
        limit = HE_STANDARD_128_MAX_BITS[n]
        if sum(sizes) > limit:
            raise ConfigError(
                f"preset {self.name!r}: the coefficient modulus has {sum(sizes)} bits; the HE "
                f"Standard allows at most {limit} bits at poly_modulus_degree={n} for 128-bit "
                "security"
            )
        if not _is_int(self.scale_bits) or not 20 <= self.scale_bits < sizes[0]:
            raise ConfigError(
                f"preset {self.name!r}: scale_bits must be an integer in [20, {sizes[0]}) (below "
                f"the first prime's size), got {self.scale_bits!r}"
            )
        bound = self.max_abs
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not math.isfinite(bound)
            or bound <= 0
        ):
            raise ConfigError(
                f"preset {self.name!r}: max_abs must be a finite number > 0, got {bound!r}"
            )
        if math.log2(bound) + self.scale_bits > self.data_bits - 2:
            raise ConfigError(
                f"preset {self.name!r}: max_abs * 2**scale_bits = 2**"
                f"{math.log2(bound) + self.scale_bits:.2f} exceeds 2**{self.data_bits - 2} "
                f"(a quarter of the {self.data_bits}-bit ciphertext modulus): sums could overflow"
            )
        if not isinstance(self.description, str):
            raise ConfigError(f"preset {self.name!r}: description must be a string")

    @property
    def slots(self) -> int:
        """Real values per ciphertext: ``poly_modulus_degree / 2``."""
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the ciphertext-level modulus (every prime but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def total_bits(self) -> int:
        """Bits of the whole coefficient modulus, special prime included (the security figure)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale(self) -> float:
        """The encoding scale ``2**scale_bits``."""
        return float(2**self.scale_bits)

    def to_dict(self) -> dict[str, Any]:
        """The preset as plain JSON-able values (the form stored in context artefacts)."""
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "max_abs": self.max_abs,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CKKSPreset:
        """Rebuild a preset from :meth:`to_dict` output; every check runs again.

        Errors: ConfigError for missing or extra keys and for any invalid value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("a preset must be a mapping")
        expected = {
            "name",
            "poly_modulus_degree",
            "coeff_mod_bit_sizes",
            "scale_bits",
            "max_abs",
            "description",
        }
        if set(data) != expected:
            raise ConfigError(f"a preset needs exactly the keys {sorted(expected)}")
        sizes = data["coeff_mod_bit_sizes"]
        if not isinstance(sizes, list | tuple):
            raise ConfigError("coeff_mod_bit_sizes must be a list of integers")
        return cls(
            name=data["name"],
            poly_modulus_degree=data["poly_modulus_degree"],
            coeff_mod_bit_sizes=tuple(sizes),
            scale_bits=data["scale_bits"],
            max_abs=data["max_abs"],
            description=data["description"],
        )


#: The presets by name. ``n8192-add`` is the default.
PRESETS: Mapping[str, CKKSPreset] = MappingProxyType(
    {
        p.name: p
        for p in (
            CKKSPreset(
                name="n8192-add",
                poly_modulus_degree=8192,
                coeff_mod_bit_sizes=(56, 60),
                scale_bits=45,
                max_abs=512.0,
                description=(
                    "additions only; 4096 values per ciphertext; 116 of 218 bits; |value| <= 512; "
                    "about 1e-10 absolute error for ten sites; expansion about 7.6x"
                ),
            ),
            CKKSPreset(
                name="n16384-add",
                poly_modulus_degree=16384,
                coeff_mod_bit_sizes=(56, 60),
                scale_bits=45,
                max_abs=512.0,
                description=(
                    "additions only; 8192 values per ciphertext (half as many ciphertexts); 116 of "
                    "438 bits (far above 128-bit security); |value| <= 512; expansion about 7.6x"
                ),
            ),
            CKKSPreset(
                name="n8192-add-wide",
                poly_modulus_degree=8192,
                coeff_mod_bit_sizes=(60, 60),
                scale_bits=40,
                max_abs=2.0**18,
                description=(
                    "additions only, for large magnitudes (whole weights rather than updates); "
                    "|value| <= 262144; about 4e-9 absolute error for ten sites; expansion 8.0x"
                ),
            ),
            CKKSPreset(
                name="n8192-depth2",
                poly_modulus_degree=8192,
                coeff_mod_bit_sizes=(60, 40, 40, 60),
                scale_bits=40,
                max_abs=2.0**20,
                description=(
                    "TenSEAL's tutorial parameters (depth-2 modulus, 218-bit limit): room for two "
                    "multiplications that aggregation never uses; for comparison only; expansion "
                    "about 20x"
                ),
            ),
        )
    }
)

#: The preset used when none is named: additions only, two primes, N = 8192.
DEFAULT_PRESET = "n8192-add"


def get_preset(preset: str | CKKSPreset | None = None) -> CKKSPreset:
    """Return the preset named ``preset`` (None: the default), or ``preset`` itself.

    Errors: ConfigError for an unknown name or a value that is neither a name nor a preset.
    """
    if preset is None:
        return PRESETS[DEFAULT_PRESET]
    if isinstance(preset, CKKSPreset):
        return preset
    if isinstance(preset, str):
        try:
            return PRESETS[preset]
        except KeyError:
            raise ConfigError(
                f"unknown CKKS preset {preset!r}; choose one of {sorted(PRESETS)}"
            ) from None
    raise ConfigError(f"preset must be a preset name or a CKKSPreset, got {type(preset).__name__}")
