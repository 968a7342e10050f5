"""Differential privacy: accountants, noise calibration, the privacy ledger, budgets and the audit.

The names a user needs first:

* :func:`compute_epsilon`, :func:`calibrate_noise`, :func:`epsilon_of_events`,
  :class:`PrivacyEvent` - accounting for Poisson-subsampled Gaussian steps (``"rdp"``, ``"prv"``,
  ``"pld"``), usable without any training;
* :class:`PrivacyConfig` - the ``privacy.*`` section of an experiment;
* :class:`PrivacyLedger`, :class:`LedgerEntry` - the tamper-evident record of what ran;
* :func:`check_budget` - refuse a round before it would exceed a budget;
* :func:`audit_run` - ``secure-fl audit RUN_DIR``.

Importing this package imports numpy and scipy only; Opacus (and with it torch), dp_accounting and
matplotlib are imported when first needed.
"""

from secure_fl.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    calibrate_noise,
    compute_epsilon,
    epsilon_of_events,
    rdp_poisson_gaussian,
    rdp_to_epsilon,
)
from secure_fl.privacy.audit import AuditResult, Finding, audit_run
from secure_fl.privacy.budget import BudgetStatus, check_budget, federation_epsilon
from secure_fl.privacy.config import PrivacyConfig
from secure_fl.privacy.ledger import (
    LEDGER_FILENAME,
    LedgerEntry,
    LedgerHead,
    LedgerIntegrityError,
    LedgerRecord,
    PrivacyLedger,
)

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FILENAME",
    "AuditResult",
    "BudgetStatus",
    "Finding",
    "LedgerEntry",
    "LedgerHead",
    "LedgerIntegrityError",
    "LedgerRecord",
    "PrivacyConfig",
    "PrivacyEvent",
    "PrivacyLedger",
    "audit_run",
    "calibrate_noise",
    "check_budget",
    "compute_epsilon",
    "epsilon_of_events",
    "federation_epsilon",
    "rdp_poisson_gaussian",
    "rdp_to_epsilon",
]
