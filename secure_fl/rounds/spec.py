"""One typed aggregation spec: what every driver (in process, gRPC, simulation, training) reads.

:class:`AggregationSpec` replaces the four shapes the options used to have (the transport's
AggregationSettings, the aggregators' keyword arguments, ``make_config`` keywords and training's
name + untyped options dict). It validates at construction, names the field and the allowed range,
and refuses an option that does not apply to the protocol, listing the ones that do. Imports
neither numpy nor torch: reading a config stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from secure_fl import validation as v
from secure_fl.errors import ConfigError

#: The aggregations, in the order people usually meet them.
PROTOCOLS = ("plain", "secagg", "secagg+", "ckks")

_MASKED = ("clip_range", "precision", "bits", "l2_clip", "threshold", "dropout_rate",
           "corrupt_fraction", "active")  # fmt: skip

#: The spec fields each protocol accepts as options (anything else is refused by name).
OPTIONS: Mapping[str, tuple[str, ...]] = {
    "plain": ("l2_clip",),
    "secagg": _MASKED,
    "secagg+": (*_MASKED, "k"),
    "ckks": ("preset", "l2_clip", "chunk_ciphertexts", "workers"),
}

#: Options a driver accepts beside the spec (not part of the round: they say how the in-process
#: driver gets its randomness and keys). ``seed`` makes every random choice reproducible (tests
#: and simulation only: whoever knows the seed can recompute the masks).
DRIVER_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "plain": (),
    "secagg": ("seed",),
    "secagg+": ("seed",),
    "ckks": ("secret", "public", "fingerprint", "measure_error"),
}

#: Largest ``chunk_ciphertexts`` (ciphertexts per CKKS frame).
MAX_CHUNK_CIPHERTEXTS = 4096


@dataclass(frozen=True)
class AggregationSpec:
    """How one aggregation combines updates, validated at construction.

    * ``protocol`` -- one of :data:`PROTOCOLS`.
    * ``clip_range`` (> 0), ``precision`` (in (0, 1)), ``bits`` (32, 64 or None: the smallest
      that cannot wrap) -- the fixed-point encoding (:func:`secure_fl.encoding.plan_bit_width`).
    * ``l2_clip`` -- optional L2 bound on each site's whole update (> 0), applied by the site.
    * ``threshold`` (>= 2), ``k`` (SecAgg+ only: an even degree in [2, n - 2], or n - 1; the
      round checks it against n) -- protocol parameters; by default
      chosen from the number of sites, ``dropout_rate`` and ``corrupt_fraction`` (each in
      [0, 0.5), the range a site's own policy accepts).
    * ``active`` -- the active-adversary SecAgg variant (default True).
    * ``preset``, ``chunk_ciphertexts`` (in [1, 4096]), ``workers`` (>= 1) -- CKKS.

    Fields that do not apply to ``protocol`` are ignored by it; given by name through
    :meth:`from_options` (``aggregators.create``, training configs) they are refused, listing
    the options of the protocol (:data:`OPTIONS`).

    Errors: ConfigError naming ``aggregation.<field>`` and its allowed range.
    """

    protocol: str = "secagg+"
    clip_range: float = 10.0
    precision: float = 2.0**-24
    bits: int | None = None
    l2_clip: float | None = None
    threshold: int | None = None
    k: int | None = None
    dropout_rate: float = 0.1
    corrupt_fraction: float = 0.0
    active: bool = True
    chunk_ciphertexts: int = 64
    preset: str | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        self._validate("aggregation")

    def _validate(self, where: str) -> None:
        name = f"{where}.{{}}".format
        protocol = v.choice(name("protocol"), self.protocol, PROTOCOLS)
        checked: dict[str, Any] = {
            "clip_range": v.positive(name("clip_range"), self.clip_range),
            "precision": v.real(
                name("precision"), self.precision, low=0.0, high=1.0, low_open=True, high_open=True
            ),
            "bits": v.optional(name("bits"), self.bits, lambda n, x: v.choice(n, x, (32, 64))),
            "l2_clip": v.optional(name("l2_clip"), self.l2_clip, v.positive),
            "threshold": v.optional(
                name("threshold"), self.threshold, lambda n, x: v.integer(n, x, low=2)
            ),
            "k": v.optional(name("k"), self.k, lambda n, x: v.integer(n, x, low=2)),
            "dropout_rate": v.fraction(name("dropout_rate"), self.dropout_rate, high=0.5),
            "corrupt_fraction": v.fraction(
                name("corrupt_fraction"), self.corrupt_fraction, high=0.5
            ),
            "active": v.boolean(name("active"), self.active),
            "chunk_ciphertexts": v.integer(
                name("chunk_ciphertexts"), self.chunk_ciphertexts, low=1, high=MAX_CHUNK_CIPHERTEXTS
            ),
            "preset": v.optional(name("preset"), self.preset, v.string),
            "workers": v.integer(name("workers"), self.workers, low=1),
        }
        if protocol == "secagg+" and checked["k"] is not None and checked["threshold"] is None:
            raise ConfigError(f"{name('threshold')} must be given when {name('k')} is given")
        for key, value in checked.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "protocol", protocol)

    @classmethod
    def from_options(
        cls,
        protocol: str,
        options: Mapping[str, object] | None = None,
        *,
        where: str = "aggregation",
        lenient: bool = False,
    ) -> AggregationSpec:
        """The spec of ``protocol`` with ``options`` (field name -> value; a None value means
        the default). ``lenient``: every spec field is accepted, also one that does not apply to
        ``protocol`` (config files written with every field); unknown names are still refused.

        Errors: ConfigError naming ``f"{where}.{field}"`` and the allowed range; an option that
        does not apply to ``protocol`` raises ConfigError listing the options allowed for it."""
        v.choice(f"{where}.protocol", protocol, PROTOCOLS)
        opts = dict(options or {})
        for key in opts:
            if not isinstance(key, str):
                raise ConfigError(f"{where}: option names must be strings, got {key!r}")
        _refuse_unknown(where, protocol, opts, tuple(_DEFAULTS) if lenient else OPTIONS[protocol])
        kwargs = {k: val for k, val in opts.items() if val is not None}
        spec = cls.__new__(cls)
        object.__setattr__(spec, "protocol", protocol)
        for f in fields(cls):
            if f.name != "protocol":
                object.__setattr__(spec, f.name, kwargs.get(f.name, _DEFAULTS[f.name]))
        spec._validate(where)
        return spec

    @classmethod
    def split_options(
        cls,
        protocol: str,
        options: Mapping[str, object] | None = None,
        *,
        where: str = "aggregation",
    ) -> tuple[AggregationSpec, dict[str, Any]]:
        """``options`` as a driver receives them (``aggregators.create(name, **options)``): the
        spec, and the driver options of :data:`DRIVER_OPTIONS` (e.g. ``seed``) left over.

        Errors: ConfigError as :meth:`from_options`; an unknown option lists both the spec's
        and the driver's allowed options."""
        v.choice(f"{where}.protocol", protocol, PROTOCOLS)
        opts = dict(options or {})
        driver = DRIVER_OPTIONS[protocol]
        _refuse_unknown(where, protocol, opts, (*OPTIONS[protocol], *driver))
        rest = {k: opts.pop(k) for k in list(opts) if k in driver}
        return cls.from_options(protocol, opts, where=where), rest

    def options(self) -> dict[str, object]:
        """The options of this spec's protocol (JSON-able; ``from_options(protocol, options())``
        gives an equal spec)."""
        return {name: getattr(self, name) for name in OPTIONS[self.protocol]}

    @property
    def masked(self) -> bool:
        """True for SecAgg / SecAgg+."""
        return self.protocol in ("secagg", "secagg+")


def _refuse_unknown(
    where: str, protocol: str, options: Mapping[str, object], known: tuple[str, ...]
) -> None:
    """ConfigError naming the options of ``options`` outside ``known`` and listing the options
    allowed for ``protocol`` (its spec options and driver options)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = sorted({*OPTIONS[protocol], *(k for k in known if k in DRIVER_OPTIONS[protocol])})
        raise ConfigError(
            f"{where}: unknown option(s) {unknown} for protocol {protocol!r}; allowed: {allowed}"
        )


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(AggregationSpec) if f.name != "protocol"
}

__all__ = ["DRIVER_OPTIONS", "OPTIONS", "PROTOCOLS", "AggregationSpec"]
