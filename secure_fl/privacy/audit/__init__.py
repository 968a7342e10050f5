"""Audit of a run's privacy: ``secure-fl audit RUN_DIR``.

Inputs in the run folder: ``privacy_ledger.sqlite`` (+ its ``.head`` anchor), ``config.json``
(``"privacy"``: :meth:`PrivacyConfig.to_dict`, ``"rounds"``, ``"train"``, ``"data"``, ``"seed"``,
``"strategies"``), ``metrics.jsonl`` (rows with DP carry ``"privacy": {"epsilon": {site: eps},
"delta": d, "accountant": name, "ledger_head": {"count", "hash"}}``, optionally ``"scope"``:
``"ledger"`` (default: the site's whole spend so far) or ``"strategy"``), ``stopped.json`` when a
budget stopped the run, and the datalist named by ``config.json`` (``data.datalist``, or
``data.synthetic_dir/datalist.json``; ``audit_run(datalist=...)`` / ``--datalist`` override it).

Status: ``PASS`` (no error or warning; ``info`` lines may explain, e.g. a budget stop), ``FAIL``
(any error or warning) or ``NO DP`` (``privacy.level = "none"``: epsilon = infinity; never PASS).
Exit status of ``secure-fl audit``: 0 PASS, 1 FAIL, 2 usage error, 3 NO DP.

What the audit checks (each failure is a :class:`Finding`):

* the hash chain, the head anchor and every anchor copied into metrics.jsonl (``CHAIN_BROKEN``,
  ``ANCHOR_MISMATCH``); the anchors of successive DP rows must grow (``ANCHOR_NOT_MONOTONE``) and
  each must cover every ledger record of its own round (``ANCHOR_STALE``: a row re-using an
  earlier round's anchor); a DP row without an anchor is ``ANCHOR_MISSING`` (warning);
* the mechanism parameters re-derived from config.json and the datalist split - not taken from the
  ledger, which whoever can write the run folder can rebuild with a valid chain: at sample level
  the sampling rate ``q = batch_size / n_train`` and ``local_epochs * ceil(1/q)`` steps per round
  from each site's number of training cases, at site level ``q = 1`` (no amplification: the
  server sees who takes part) and one step per round when every site takes part; the least noise
  multiplier the configuration asks for (configured, or recalibrated here from
  ``target_epsilon``). A record below them is ``SAMPLING_BELOW_DERIVED``, ``STEPS_BELOW_DERIVED``
  or ``NOISE_BELOW_CONFIG``, and every epsilon below is computed with ``max(ledger, derived)``
  sampling rate and steps. Without the datalist (``DATALIST_UNAVAILABLE``, warning) sample-level
  ``q`` and steps are the ledger's;
* never more noise than the audit can justify: each record is accounted with ``min(ledger,
  justified)`` noise multiplier, the justified one being the calibrated (or configured) multiplier,
  raised only by a resume recalibration that the runner recorded (``params["resume_scale"]``,
  ``params["resume_from_round"]``) and the audit re-derives itself from the ledger's earlier records
  with :func:`secure_fl.privacy.budget.resume_noise_scale`; a record above it (beyond
  ``NOISE_REL_TOL``) is ``NOISE_ABOVE_DERIVED`` (error: e.g. a ledger rebuilt with inflated noise);
* every site's epsilon recomputed with two independent accountants (``rdp``, implemented in
  :mod:`secure_fl.privacy.accounting`, and Opacus ``prv``); they must agree within the known gap,
  RDP being an upper bound (``ACCOUNTANT_DISAGREEMENT``);
* every reported epsilon against the recomputed one at the *configuration's* delta with the
  *configuration's* accountant, on the ledger as it stood after that row's round: below it
  (``EPSILON_UNDER_REPORTED``) or above it - spend the ledger does not hold, e.g. a truncated
  tail (``EPSILON_OVER_REPORTED``); a row claiming another delta or accountant
  (``REPORT_DELTA_MISMATCH``, ``REPORT_ACCOUNTANT_MISMATCH``); DP rows without a report
  (``EPSILON_NOT_REPORTED``, warning);
* missing rounds: a metrics round without ledger records, ledger rounds not contiguous from 1, a
  site missing from a round in which it trains (``MISSING_ROUND``); a survivor named in a
  metrics row that the ledger did not charge in that round (``UNCHARGED_SURVIVOR``, error); a
  metrics round below 1 (``ROUND_NUMBERING``);
* metrics.jsonl against the ledger (:mod:`.rows`): a round the ledger confirmed (released)
  without a metrics row (``METRICS_ROW_MISSING``, error: e.g. the last row dropped); rows of a
  strategy out of round order (``METRICS_ROW_ORDER``, error); a row whose ``survivors`` list
  disagrees with its own ``dp_event.survivors`` or with the survivor count the ledger confirmed
  (distributed trust) (``METRICS_SURVIVORS_MISMATCH``, error); a row repeated exactly is
  ignored and said (``METRICS_ROW_DUPLICATE``, info: a crash between a round's row and its
  checkpoint may write it twice);
* unconfirmed intents (a crash; counted in full) and confirmations with more steps than intended
  (``UNCONFIRMED_INTENT``, ``STEPS_ABOVE_INTENT``, warnings);
* where the noise came from: a record drawn from a seeded generator is ``NOISE_PREDICTABLE``
  (error: anyone with the seed can subtract it); records that do not say (written before noise
  sources were recorded, when DP noise derived from the run seed) are ``NOISE_SOURCE_UNKNOWN``;
* level/mechanism/clip/delta differing from the configuration (``CONFIG_MISMATCH``); survivors
  below ``params["threshold"]`` (``SURVIVORS_BELOW_THRESHOLD``);
* recomputed epsilon above ``target_epsilon`` or a budget (``EPSILON_ABOVE_TARGET``,
  ``BUDGET_EXCEEDED``); a budget stop is explained (``BUDGET_STOP``, info, naming the round and
  the budget check's numbers) when stopped.json names the round right after the ledger's last
  (``STOP_INCONSISTENT`` otherwise) and one more round would really take a site or the federation
  over a budget (``STOP_UNJUSTIFIED``, warning, otherwise); a ledger that ends early without one
  is ``RUN_INCOMPLETE`` (warning: an unfinished run's spend is not final);
* how far the run got by its own artefacts: a ``checkpoints/<strategy>.pt`` round (loaded with
  ``weights_only=True``) beyond what the ledger and metrics.jsonl hold, or ``models/<strategy>.pt``
  / ``report.md`` of a run whose ledger ends early without a budget stop, or (a gRPC server's run
  folder) ``checkpoint.json`` / ``rounds/round-*.json`` showing more rounds than the ledger, is
  ``ARTEFACTS_AHEAD_OF_LEDGER`` (error: a truncated tail); an unreadable checkpoint is
  ``CHECKPOINT_UNREADABLE`` (warning).

Rounds are numbered from 1 in everything the audit writes (findings, audit.md/.json, the plot),
as in metrics.jsonl and stopped.json; the ledger stores the 0-based index (round - 1) and the
audit maps one onto the other.

What it cannot detect: a run folder rewritten *consistently* - config.json, datalist, ledger,
head file and metrics together (keep the config and the ledger head outside the run folder, e.g.
at every site); noise that was recorded but not added (the audit sees records, not tensors); at
site level with ``site_sample_rate < 1``, which sites took part in a round (steps 0 or 1); at
central trust, a survivors list edited together with its row's ``dp_event.survivors`` (the ledger
charges every roster site and records no survivor count there; the epsilon does not depend on it).

Layout (one job per module; every name stays importable from ``secure_fl.privacy.audit``):
:mod:`.model` (severities, statuses, :class:`Finding`), :mod:`.report` (:class:`AuditResult`,
``audit.md``/``.json``/``.png``), :mod:`.chain` (hash chain and anchors), :mod:`.derive`
(parameters re-derived from config.json and the datalist), :mod:`.checks` (records against the
configuration, accountants, rounds), :mod:`.epsilon` (recomputed against reported epsilon),
:mod:`.stop` (budget stops and run artefacts), :mod:`.rows` (metrics.jsonl rows against the
ledger), :mod:`.run` (:func:`audit_run`) and :mod:`.cli`
(``secure-fl audit``). The accountant the audit calls is looked up here, as
``epsilon_of_events``, when :func:`audit_run` runs.
"""

from secure_fl.privacy.accounting import epsilon_of_events
from secure_fl.privacy.audit.cli import main
from secure_fl.privacy.audit.derive import NOISE_REL_TOL, Derived
from secure_fl.privacy.audit.model import (
    AUDIT_ACCOUNTANTS,
    ERROR,
    EXIT_STATUS,
    FAIL,
    INFO,
    NO_DP,
    PASS,
    WARNING,
    CurvePoint,
    Finding,
)
from secure_fl.privacy.audit.report import AuditResult
from secure_fl.privacy.audit.run import audit_run

__all__ = [
    "AUDIT_ACCOUNTANTS",
    "ERROR",
    "EXIT_STATUS",
    "FAIL",
    "INFO",
    "NOISE_REL_TOL",
    "NO_DP",
    "PASS",
    "WARNING",
    "AuditResult",
    "CurvePoint",
    "Derived",
    "Finding",
    "audit_run",
    "epsilon_of_events",
    "main",
]
