"""Parameter selection for SecAgg and SecAgg+ (:mod:`secure_fl.secagg.graph` builds the graphs).

The Shamir threshold ``t`` and the SecAgg+ degree ``k`` are chosen so that the failure events of
Bell et al. (2020) stay below their targets: security (the server and the corrupt sites could
reconstruct an honest site's secrets, ``2**-sigma``), correctness (a secret cannot be recovered,
``2**-eta``) and connectivity (the honest survivors' graph splits, ``2**-sigma``); see
:func:`secagg_plus_parameters` for the bounds.

Errors: ConfigError naming the argument out of range.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from secure_fl.errors import ConfigError

_log = logging.getLogger("secure_fl.secagg")
_warned: set[str] = set()

#: Statistical security parameter: failure events that would leak are bounded by 2**-SIGMA.
DEFAULT_SIGMA = 40
#: Correctness parameter: a round fails to produce the sum with probability at most 2**-ETA.
DEFAULT_ETA = 30


def assumed_corrupt(num_sites: int, corrupt_fraction: float) -> int:
    """The number of sites ``ceil(corrupt_fraction * num_sites)`` that a site assuming
    ``corrupt_fraction`` treats as possibly colluding with the server. A fraction computed as
    ``c / num_sites`` gives back ``c`` (a float product a hair above an integer is not rounded up).

    Errors: ConfigError on arguments out of range, naming them.
    """
    if not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ConfigError(f"corrupt_fraction must be in [0, 1], got {corrupt_fraction!r}")
    return min(num_sites, max(0, math.ceil(corrupt_fraction * num_sites - 1e-9)))


def consistency_quorum(num_sites: int, corrupt_fraction: float) -> int:
    """How many distinct sites of the round must sign a site's survivor set ``U3`` before the
    site reveals any share (active variant): the smallest count above ``(n + c) / 2`` with
    ``c = assumed_corrupt(n, corrupt_fraction)``.

    Guarantee: every honest site signs one set only, so two different survivor sets cannot both
    reach the quorum (their signers would share more than ``c`` sites, hence an honest one): all
    honest sites that reveal shares agree on ``U3``, whatever the graph. For the complete graph
    this is what the threshold rule ``2t > n + c`` already gives. It is a liveness cost for
    SecAgg+: more than ``(n + c) / 2`` sites must reach the consistency phase.

    Errors: ConfigError on arguments out of range.
    """
    return (num_sites + assumed_corrupt(num_sites, corrupt_fraction)) // 2 + 1


def minimum_threshold(
    num_sites: int,
    k: int,
    corrupt_fraction: float,
    *,
    active: bool = True,
    sigma: int = DEFAULT_SIGMA,
) -> int:
    """The smallest Shamir threshold a site may accept (its own policy, not the server's word).

    Each site's secrets are shared among its ``k + 1`` holders (its ``k`` neighbours and itself), of
    which ``c`` may be corrupt and collude with the server. Bonawitz et al. (2017, Thm. 6.3/A.2):

    * active (malicious server): secure iff ``2t > (k + 1) + c`` — the server cannot collect ``t``
      shares of both secrets of one honest site even when it equivocates;
    * semi-honest server: secure iff ``t > c`` — the corrupt holders alone cannot reconstruct.

    Complete graph (``k == num_sites - 1``): ``c = min(ceil(corrupt_fraction * n), n - 1)`` exactly.
    Sparse graph (SecAgg+): ``c`` is a random variable ``Binomial(k, corrupt_fraction)`` over the
    random graph; ``t`` is the smallest with ``n * P[c >= 2t - k - 1] <= 2**-sigma`` (active) or
    ``n * P[c >= t] <= 2**-sigma`` (semi-honest), the security event of :func:`secagg_plus_parameters`.
    The result is never below 2.

    Errors: ConfigError on arguments out of range, naming them, or when even ``t = k + 1`` is not
    secure (too many corrupt sites for this neighbourhood size).
    """
    if not isinstance(num_sites, int) or num_sites < 2:
        raise ConfigError(f"num_sites must be an integer >= 2, got {num_sites!r}")
    n = num_sites
    if not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ConfigError(f"k must be an integer in [1, {n - 1}], got {k!r}")
    if not 0.0 <= corrupt_fraction < 1.0:
        raise ConfigError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction!r}")
    if not isinstance(sigma, int) or sigma < 1:
        raise ConfigError(f"sigma must be an integer >= 1, got {sigma!r}")
    holders = k + 1
    if k == n - 1:
        corrupt = min(math.ceil(corrupt_fraction * n), n - 1)
        t = (holders + corrupt) // 2 + 1 if active else corrupt + 1
    else:
        target = 2.0**-sigma
        for t in range(1, holders + 1):
            low = 2 * t - holders if active else t
            if n * binom_sf(k, low, corrupt_fraction) <= target:
                break
        else:
            t = holders + 1
    t = max(t, 2)
    if t > holders:
        raise ConfigError(
            f"no secure threshold: with k={k} neighbours ({holders} share holders) and "
            f"corrupt_fraction={corrupt_fraction} the {'active' if active else 'semi-honest'} "
            f"variant needs t > {holders}"
        )
    return t


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(message)


def _log_binom_pmf(n: int, k: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def binom_sf(n: int, k: int, p: float) -> float:
    """P[Binomial(n, p) >= k], computed in log space (exact up to float rounding)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return min(1.0, sum(math.exp(_log_binom_pmf(n, j, p)) for j in range(k, n + 1)))


def binom_cdf(n: int, k: int, p: float) -> float:
    """P[Binomial(n, p) <= k]."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.exp(_log_binom_pmf(n, j, p)) for j in range(0, k + 1)))


@dataclass(frozen=True)
class MaskingParameters:
    """The graph degree ``k`` and Shamir threshold ``t`` chosen for a federation.

    ``k == n - 1`` means the complete graph (classic SecAgg). ``holders = k + 1`` parties hold shares
    of each site's secrets (its neighbours and itself). The bounds below are the failure probabilities
    of the three events the choice controls, each at most the stated target.
    """

    num_sites: int
    k: int
    threshold: int
    dropout_rate: float
    corrupt_fraction: float
    security_failure: float
    correctness_failure: float
    connectivity_failure: float

    @property
    def holders(self) -> int:
        return self.k + 1

    @property
    def complete(self) -> bool:
        return self.k == self.num_sites - 1


def _check_rates(num_sites: int, dropout_rate: float, corrupt_fraction: float) -> None:
    if not isinstance(num_sites, int) or num_sites < 2:
        raise ConfigError(f"num_sites must be an integer >= 2, got {num_sites!r}")
    if not (0.0 <= dropout_rate < 1.0):
        raise ConfigError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if not (0.0 <= corrupt_fraction < 1.0):
        raise ConfigError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction!r}")
    if dropout_rate + corrupt_fraction >= 1.0:
        raise ConfigError(
            "dropout_rate + corrupt_fraction must be below 1, got "
            f"{dropout_rate} + {corrupt_fraction}"
        )


def secagg_parameters(
    num_sites: int, *, dropout_rate: float = 0.0, corrupt_fraction: float = 0.0
) -> MaskingParameters:
    """Threshold for classic SecAgg (complete graph).

    The threshold is the smallest ``t`` with ``2t > n + c`` where
    ``c = min(ceil(corrupt_fraction * n), n - 1)``: the condition under which, in the active variant,
    a server colluding with ``c`` sites cannot obtain both kinds of shares of one honest site
    (Bonawitz et al. 2017, section 6); it equals :func:`minimum_threshold` for the complete graph.
    It is at least a strict majority. It must not exceed the number of sites expected to survive.

    Small federations: when fewer than one dropout is expected (``dropout_rate * n < 1``) but the
    secure ``t`` exceeds the expected survivors, ``t = n`` is returned (secure; no dropout
    tolerance: any dropout aborts the round) and a WARNING is logged once on the
    ``secure_fl.secagg`` logger. With two sites this is always the case, and the warning also says
    that each site can derive the other's update from the mean.

    Errors: ConfigError when no threshold satisfies both conditions.
    """
    _check_rates(num_sites, dropout_rate, corrupt_fraction)
    n = num_sites
    corrupt = min(math.ceil(corrupt_fraction * n), n - 1)
    t = (n + corrupt) // 2 + 1
    survivors = math.floor((1.0 - dropout_rate) * n + 1e-9)
    if n == 2:
        _warn_once(
            "two-sites",
            "secagg with 2 sites: threshold 2, no dropout tolerance; with two parties each site "
            "can derive the other's update from the mean (secure aggregation hides nothing "
            "between them)",
        )
        return MaskingParameters(n, n - 1, n, dropout_rate, corrupt_fraction, 0.0, 0.0, 0.0)
    if t > survivors and dropout_rate * n < 1.0:
        _warn_once(
            f"small-{n}",
            f"secagg with {n} sites: threshold {n} (all sites), no dropout tolerance: any dropout "
            "aborts the round",
        )
        return MaskingParameters(n, n - 1, n, dropout_rate, corrupt_fraction, 0.0, 0.0, 0.0)
    if t > survivors:
        raise ConfigError(
            f"no safe threshold for num_sites={n}: security needs t >= {t} "
            f"(corrupt_fraction={corrupt_fraction}), but with dropout_rate={dropout_rate} only "
            f"{survivors} sites are expected to survive"
        )
    return MaskingParameters(n, n - 1, t, dropout_rate, corrupt_fraction, 0.0, 0.0, 0.0)


def secagg_plus_parameters(
    num_sites: int,
    *,
    dropout_rate: float = 0.05,
    corrupt_fraction: float = 0.05,
    sigma: int = DEFAULT_SIGMA,
    eta: int = DEFAULT_ETA,
) -> MaskingParameters:
    """Choose the neighbourhood size ``k`` and threshold ``t`` for SecAgg+ (Bell et al. 2020).

    Following the paper's analysis, three events are bounded, each by a union bound over the ``n``
    sites, with each site dropping out with probability ``dropout_rate`` and being corrupt with
    probability ``corrupt_fraction`` independently of its position in the (random) graph:

    * security: a site's ``k + 1`` share holders include ``c`` corrupt ones with ``2t <= k + 1 + c``,
      so the server could collect ``t`` shares of both of its secrets. Bound ``n * P[c >= 2t - k - 1]
      <= 2**-sigma``.
    * correctness: fewer than ``t`` of a site's ``k`` neighbours survive, so its secret cannot be
      recovered. Bound ``n * P[Binomial(k, 1 - dropout_rate) < t] <= 2**-eta``.
    * connectivity: the honest survivors split into parts, so the sum of one part leaks. On the
      permuted Harary ring that needs ``k/2`` consecutive bad positions: bound
      ``n * (dropout_rate + corrupt_fraction)**(k/2) <= 2**-sigma``.

    The smallest even ``k`` (and for it the smallest ``t``) meeting all three is returned; when none
    below ``n - 1`` does, the complete graph with the SecAgg threshold is returned.

    Consistency quorum (active variant): every site reveals shares only when more than
    ``(n + c) / 2`` sites of the round, ``c = ceil(corrupt_fraction * n)``, signed its survivor set
    (:func:`consistency_quorum`), so that many sites must survive to the consistency phase
    whatever ``k``. When the expected survivors ``floor((1 - dropout_rate) * n)`` are fewer (and
    at least one dropout is expected), no round can finish and ConfigError is raised (the same rule
    as :func:`secagg_parameters`); the
    probability that fewer survive is added to ``correctness_failure``, and a WARNING is logged
    once on the ``secure_fl.secagg`` logger when it exceeds ``2**-eta``.

    Errors: ConfigError on rates outside [0, 1), when the consistency quorum exceeds the expected
    survivors, or when even the complete graph cannot meet the bounds.
    """
    _check_rates(num_sites, dropout_rate, corrupt_fraction)
    if sigma < 1 or eta < 1:
        raise ConfigError(f"sigma and eta must be >= 1, got sigma={sigma}, eta={eta}")
    n = num_sites
    target_sec = 2.0**-sigma
    target_cor = 2.0**-eta
    quorum = consistency_quorum(n, corrupt_fraction)
    expected_survivors = math.floor((1.0 - dropout_rate) * n + 1e-9)
    if expected_survivors < quorum and dropout_rate * n >= 1.0:
        raise ConfigError(
            f"dropout_rate={dropout_rate} is too high for num_sites={n}: the consistency check "
            f"needs signatures from {quorum} sites (more than (n + c) / 2, c = "
            f"{assumed_corrupt(n, corrupt_fraction)} from corrupt_fraction={corrupt_fraction}), "
            f"but only {expected_survivors} are expected to survive; dropout_rate must be at most "
            f"{(n - quorum) / n:.3g}"
        )
    quorum_failure = binom_cdf(n, quorum - 1, 1.0 - dropout_rate)
    if quorum_failure > target_cor:
        _warn_once(
            f"quorum-{n}-{dropout_rate}-{corrupt_fraction}",
            f"secagg+ with {n} sites and dropout_rate={dropout_rate}: a round fails with "
            f"probability {quorum_failure:.2g} because fewer than {quorum} sites reach the "
            "consistency check",
        )
    bad = dropout_rate + corrupt_fraction
    for k in range(2, n - 1, 2):
        connectivity = n * bad ** (k // 2) if bad > 0 else 0.0
        if connectivity > target_sec:
            continue
        for t in range(1, k + 1):
            security = n * binom_sf(k, 2 * t - k - 1, corrupt_fraction)
            if security > target_sec:
                continue
            correctness = n * binom_cdf(k, t - 1, 1.0 - dropout_rate)
            if correctness > target_cor:
                break  # a larger t only makes correctness worse
            return MaskingParameters(
                n,
                k,
                t,
                dropout_rate,
                corrupt_fraction,
                security,
                correctness + quorum_failure,
                connectivity,
            )
    return secagg_parameters(n, dropout_rate=dropout_rate, corrupt_fraction=corrupt_fraction)
