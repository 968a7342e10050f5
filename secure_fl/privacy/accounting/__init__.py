"""Privacy accounting for Poisson-subsampled Gaussian steps: epsilon, composition, noise calibration.

Every differentially private step that secure_fl runs is, for accounting, one *event*: a Gaussian
mechanism with noise multiplier ``sigma`` (noise standard deviation divided by the L2 sensitivity,
i.e. the clip bound) applied to a Poisson subsample with rate ``q``, repeated ``steps`` times.
Sample-level DP-SGD at a site (Opacus), site-level DP-FedAvg (each site included with probability
``q`` per round, one step per round) and the distributed mechanisms (through the Gaussian-equivalent
multiplier that :mod:`secure_fl.privacy.distributed` reports) are all accounted this way. Neighbouring
datasets differ by adding or removing one record (a patient at sample level, an institution at site
level).

Accountants (``accountant=``):

* ``"rdp"`` - Renyi DP of the Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019, "Renyi
  Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3: the exact binomial sum for
  integer orders, quadrature of the defining integral for fractional ones), composed additively
  over events and converted to (epsilon, delta) with the conversion of Canonne, Kamath & Steinke
  2020 (arXiv:2004.00010, Prop. 12; also Balle et al. 2020), minimised over a fixed grid of orders.
  Implemented here (numpy/scipy, no torch). Every order gives a valid bound, so the result is an
  *upper bound* on the tight epsilon (never the exact value); it is typically 5-20 % above it.
  Events whose RDP bound is only established at integer orders (``integer_orders=True``: the
  distributed Skellam mechanism) are evaluated at ``ceil(alpha)`` for a fractional order ``alpha``,
  which is valid because Renyi divergence is non-decreasing in the order.
* ``"prv"`` - numerical composition of privacy-loss random variables (Gopi, Lee & Wutschitz 2021)
  through Opacus' ``PRVAccountant``. We report its **upper** estimate (``eps_upper``: the estimate
  at ``delta - delta_error`` plus ``eps_error``), never the point estimate, so the value is not
  below the tight epsilon of the mechanism up to the accountant's own stated error. Default
  ``eps_error`` is :data:`PRV_EPS_ERROR`, ``delta_error = delta / 1000``.
* ``"pld"`` - privacy-loss distributions with pessimistic discretisation (Google's ``dp_accounting``,
  Doroshenko et al. 2022), optional (``pip install dp-accounting``): an upper bound by construction.

Where the PRV/PLD backend cannot evaluate a configuration (for example a delta so small that
floating point error dominates, or an epsilon so close to 0 that the discretised curve never reaches
the target delta) we fall back to the RDP bound - also an upper bound - and emit a ``UserWarning``;
the reported epsilon is therefore never below the tight value.

Known gaps between the accountants (used by the audit): ``prv`` and ``pld`` agree within about
``PRV_EPS_ERROR``; ``rdp`` is at least the tight epsilon, so ``rdp >= prv - 2 * PRV_EPS_ERROR``.

Layout (every name stays importable from ``secure_fl.privacy.accounting``): :mod:`.events`
(:class:`PrivacyEvent`, accountant names, argument checks), :mod:`.rdp` (the RDP accountant),
:mod:`.compose` (:func:`epsilon_of_events`, :func:`compute_epsilon`, PRV and PLD) and
:mod:`.calibrate` (:func:`calibrate_noise`).
"""

from secure_fl.privacy.accounting.calibrate import bisect_geometric, calibrate_noise
from secure_fl.privacy.accounting.compose import (
    canonical_events,
    compute_epsilon,
    epsilon_of_events,
)
from secure_fl.privacy.accounting.events import (
    ACCOUNTANTS,
    PLD_DISCRETIZATION,
    PRV_EPS_ERROR,
    PrivacyEvent,
)
from secure_fl.privacy.accounting.events import _check_accountant as _check_accountant
from secure_fl.privacy.accounting.events import _check_delta as _check_delta
from secure_fl.privacy.accounting.events import _check_int as _check_int
from secure_fl.privacy.accounting.events import _check_real as _check_real
from secure_fl.privacy.accounting.rdp import (
    DEFAULT_ORDERS,
    INTEGER_ORDERS,
    Conversion,
    rdp_poisson_gaussian,
    rdp_to_epsilon,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "INTEGER_ORDERS",
    "PLD_DISCRETIZATION",
    "PRV_EPS_ERROR",
    "Conversion",
    "PrivacyEvent",
    "bisect_geometric",
    "calibrate_noise",
    "canonical_events",
    "compute_epsilon",
    "epsilon_of_events",
    "rdp_poisson_gaussian",
    "rdp_to_epsilon",
]
