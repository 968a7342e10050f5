"""The aggregator interface that pipelines import, and the input checks every aggregator shares."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from secure_fl import validation
from secure_fl.encoding import UpdateSpec, check_same_spec, flatten
from secure_fl.errors import ConfigError, InvalidUpdateError

#: What ``aggregate`` accepts as ``updates``: site name -> update, or (site name, update) pairs.
Updates = Mapping[str, Any] | Sequence[tuple[str, Any]]

#: The logger of every aggregator (clipping warnings and the like).
log = logging.getLogger("secure_fl.aggregators")


@dataclass(frozen=True)
class AggregationReport:
    """What every aggregator reports about one aggregation: the one list of report keys.

    Every aggregator's ``AggregationResult.report`` has exactly these keys (:data:`REPORT_KEYS`),
    so that code reading reports never depends on which aggregator ran; a key that does not apply
    to an aggregator is None, never absent.

    Common to all:

    * ``aggregator`` -- its name (``plain``, ``secagg``, ``secagg+``, ``ckks``);
    * ``included`` -- sites whose update is in the mean; ``dropped`` -- sites that dropped out;
    * ``clipped`` -- site -> number of values clipped to ``clip_range`` (0 where nothing is clipped
      per value: ``plain`` never clips values, ``ckks`` refuses them); ``clipped_total`` their sum;
    * ``clipped_updates`` -- sites whose whole update was clipped to ``l2_clip``;
    * ``bytes_sent`` -- site -> bytes it sent; ``seconds`` -- wall time of the whole call;
    * ``max_error`` -- bound (secagg) or measurement (ckks) of the largest absolute error of the
      mean, 0.0 for ``plain``;
    * ``expansion`` -- mean bytes sent per included site / float32 bytes of the update.

    Measured where the aggregator has the parts (else None): ``server_bytes_sent``,
    ``site_seconds`` (site -> seconds), ``server_seconds``, ``decrypt_seconds`` (ckks),
    ``max_rel_error`` (plain 0.0; ckks measured), ``round`` (the aggregator's round counter).

    SecAgg / SecAgg+ only: ``threshold``, ``k`` (graph degree), ``active``, ``excluded`` (sites
    the protocol excluded), ``bits``, ``frac_bits``, ``clip_range``.

    CKKS only: ``preset``, ``poly_modulus_degree``, ``coeff_mod_bit_sizes``, ``scale_bits``,
    ``max_abs``, ``ciphertexts``, ``chunks``, ``chunk_ciphertexts``, ``peak_pending_chunks``,
    ``fingerprint``, ``workers``.
    """

    aggregator: str
    included: list[str]
    dropped: list[str]
    clipped: dict[str, int]
    clipped_total: int
    clipped_updates: list[str]
    bytes_sent: dict[str, int]
    seconds: float
    max_error: float
    expansion: float | None = None
    server_bytes_sent: int | None = None
    site_seconds: dict[str, float] | None = None
    server_seconds: float | None = None
    decrypt_seconds: float | None = None
    max_rel_error: float | None = None
    round: int | None = None
    threshold: int | None = None
    k: int | None = None
    active: bool | None = None
    excluded: list[str] | None = None
    bits: int | None = None
    frac_bits: int | None = None
    clip_range: float | None = None
    preset: str | None = None
    poly_modulus_degree: int | None = None
    coeff_mod_bit_sizes: list[int] | None = None
    scale_bits: int | None = None
    max_abs: float | None = None
    ciphertexts: int | None = None
    chunks: int | None = None
    chunk_ciphertexts: int | None = None
    peak_pending_chunks: int | None = None
    fingerprint: str | None = None
    workers: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as the plain dict ``AggregationResult.report`` holds (every key present)."""
        return asdict(self)


#: The keys of every aggregator's report, in order (the fields of :class:`AggregationReport`).
REPORT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(AggregationReport))


def warn_clipped(aggregator: str, site: str, clipped: int, size: int, clip_range: float) -> None:
    """Log at WARNING (logger ``secure_fl.aggregators``) that ``clipped`` of the ``size`` values
    of ``site``'s update lay beyond ``clip_range`` and were clipped, so the mean is biased
    (``plain`` would give the true mean, ``ckks`` refuses such values). Nothing when 0."""
    if clipped <= 0:
        return
    log.warning(
        "%s: site %r: %d of %d values lay outside [-%g, %g] (clip_range) and were clipped; "
        "the mean is biased. Raise clip_range or clip updates in L2 (l2_clip).",
        aggregator,
        site,
        clipped,
        size,
        clip_range,
        clip_range,
    )


@dataclass(frozen=True)
class AggregationResult:
    """``mean`` has the structure of one update (same container, keys, shapes, dtypes, framework).

    ``report`` has exactly the keys of :class:`AggregationReport` (:data:`REPORT_KEYS`), those that
    do not apply to the aggregator set to None.
    """

    mean: Any = field(repr=False)
    report: Mapping[str, Any]


@dataclass(frozen=True)
class PreparedRound:
    """Validated inputs of one aggregation: flat float64 vectors in a fixed site order."""

    sites: tuple[str, ...]
    vectors: Mapping[str, np.ndarray] = field(repr=False)
    spec: UpdateSpec
    weights: Mapping[str, float]
    dropped: frozenset[str]

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(s for s in self.sites if s not in self.dropped)


def prepare(
    updates: Updates,
    weights: Mapping[str, float] | None,
    dropped: Iterable[str],
    *,
    min_sites: int = 1,
    expected: UpdateSpec | None = None,
) -> PreparedRound:
    """Validate and flatten one round's inputs.

    Every update must have one structure: ``expected`` (the model's, when the caller knows it),
    else the structure most sites share. The error names the sites that differ from it, not
    whichever site happened to come first (see :func:`agreed_spec`).

    Errors: InvalidUpdateError on duplicate site ids, a malformed update, NaN/Inf, or updates whose
    structure, shapes or dtypes differ between sites; ConfigError on weights that are missing,
    extra, not finite or not positive, and on ``dropped`` naming unknown sites or every site.
    """
    if isinstance(updates, Mapping):
        pairs = list(updates.items())
    else:
        try:
            pairs = [(name, upd) for name, upd in updates]
        except (TypeError, ValueError) as exc:
            raise InvalidUpdateError(
                "updates must be a mapping of site name to update, or (site, update) pairs"
            ) from exc
    names = [name for name, _ in pairs]
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidUpdateError(f"site ids must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidUpdateError(f"duplicate site ids in updates: {duplicates}")
    if len(pairs) < min_sites:
        raise InvalidUpdateError(f"updates must hold at least {min_sites} sites, got {len(pairs)}")

    vectors: dict[str, np.ndarray] = {}
    specs: dict[str, UpdateSpec] = {}
    for name, update in pairs:
        vectors[name], specs[name] = flatten(update, site=name)
    spec = agreed_spec(specs, expected)

    if weights is None:
        resolved = dict.fromkeys(names, 1.0)
    else:
        if not isinstance(weights, Mapping):
            raise ConfigError("weights must map site name to a positive number")
        missing = sorted(set(names) - set(weights))
        extra = sorted(set(weights) - set(names))
        if missing or extra:
            raise ConfigError(
                f"weights must name exactly the sites; missing {missing}, extra {extra}"
            )
        resolved = {}
        for name in names:
            w = weights[name]
            if isinstance(w, bool) or not isinstance(w, int | float | np.number):
                raise ConfigError(f"weights[{name!r}] must be a number, got {type(w).__name__}")
            if not math.isfinite(float(w)) or float(w) <= 0:
                raise ConfigError(f"weights[{name!r}] must be finite and > 0, got {w!r}")
            resolved[name] = float(w)

    if isinstance(dropped, str):
        raise ConfigError("dropped must be a collection of site names, not one string")
    gone = frozenset(dropped)
    unknown = sorted(gone - set(names))
    if unknown:
        raise ConfigError(f"dropped names sites that sent no update: {unknown}")
    if len(gone) == len(names):
        raise ConfigError("dropped names every site; nothing would be aggregated")
    return PreparedRound(tuple(names), vectors, spec, resolved, gone)


def agreed_spec(specs: Mapping[str, UpdateSpec], expected: UpdateSpec | None = None) -> UpdateSpec:
    """The one structure (names, shapes, dtypes) every site's update must have; blames the sites
    that differ.

    The reference is ``expected`` when given (the model's structure), else the structure shared
    by the most sites when exactly one structure has that count; the error names every site whose
    update differs from it, with the first difference. When no single structure is the most
    common (two sites that disagree, or a 2-2 split), the sites cannot be told apart: the error
    lists every group of sites. Protects the operator against blaming an honest site for
    another's wrong-shaped update (the reference used to be whichever site came first).

    Errors: InvalidUpdateError naming the differing sites; ConfigError if ``specs`` is empty.
    """
    if not specs:
        raise ConfigError("agreed_spec: specs must name at least one site")
    groups: list[tuple[UpdateSpec, list[str]]] = []
    for name, spec in specs.items():
        for ref, members in groups:
            if ref == spec:
                members.append(name)
                break
        else:
            groups.append((spec, [name]))
    if expected is None and len(groups) == 1:
        return groups[0][0]
    total = len(specs)
    if expected is not None:
        reference, what = expected, "the model's structure"
    else:
        top = max(len(members) for _, members in groups)
        leaders = [(ref, members) for ref, members in groups if len(members) == top]
        if len(leaders) > 1:
            first, first_members = groups[0]
            described = "; ".join(
                f"{members} vs {first_members}: {_difference(first, ref, members[0])}"
                for ref, members in groups[1:]
            )
            raise InvalidUpdateError(
                f"the {total} sites' updates have {len(groups)} different structures and none is "
                f"shared by more sites than the others, so the wrong one cannot be told: "
                f"{described}"
            )
        reference, members = leaders[0]
        what = f"the structure shared by {top} of {total} sites {members}"
    wrong = [name for name, spec in specs.items() if spec != reference]
    if not wrong:
        return reference
    details = "; ".join(_difference(reference, specs[name], name) for name in wrong)
    raise InvalidUpdateError(
        f"{len(wrong)} of {total} sites sent an update that differs from {what}: "
        f"{', '.join(wrong)} ({details})"
    )


def _difference(reference: UpdateSpec, other: UpdateSpec, site: str) -> str:
    try:
        check_same_spec(reference, other, site=site)
    except InvalidUpdateError as exc:
        return str(exc)
    return ""


def check_l2_clip(value: object) -> float | None:
    """Validate an aggregator's optional ``l2_clip`` option (finite and > 0, or None).

    Errors: ConfigError naming the option."""
    return validation.optional("l2_clip", value, validation.positive)


class Aggregator(ABC):
    """Computes the weighted mean of the surviving sites' float updates.

    Implementations differ in what the server sees: ``plain`` sees every update; ``secagg`` and
    ``secagg+`` see only masked vectors and the final sum.
    """

    name: str

    @abstractmethod
    def aggregate(
        self,
        updates: Updates,
        weights: Mapping[str, float] | None = None,
        *,
        dropped: Iterable[str] = (),
    ) -> AggregationResult:
        """Weighted mean of the updates of all sites not in ``dropped``.

        ``dropped`` names sites that vanish after the key exchange and before their masked input
        arrives; their updates are excluded and, in secure aggregation, their masks recovered.

        Errors: InvalidUpdateError, ConfigError (see :func:`prepare`); ThresholdError when too few
        sites survive for the protocol's threshold.
        """
