"""secure_fl: privacy-preserving federated learning for medical imaging.

The first names a user needs:

* :func:`secure_fl.aggregators.create` - a plain, SecAgg, SecAgg+ or CKKS aggregator behind one
  interface; :mod:`secure_fl.aggregators.dp` - differential privacy wrapped around any of them
  (``CentralGaussian``, ``DistributedNoise``).
* :mod:`secure_fl.rounds` - the transport-neutral round every driver runs: ``AggregationSpec``,
  ``plan_round``, the server and site halves of each aggregation, the byte codec of their
  messages, the sealed state export (``protocols/rounds.md``).
* :mod:`secure_fl.secagg` - the sans-IO SecAgg / SecAgg+ protocol cores and the in-process harness.
* :mod:`secure_fl.he` - CKKS homomorphic aggregation (TenSEAL).
* :mod:`secure_fl.privacy` - DP accounting, calibration, the privacy ledger and the audit.
* :mod:`secure_fl.training`, :mod:`secure_fl.data` - federated 3D-UNet training on brain MRI.
* :mod:`secure_fl.transport` - deployment over gRPC with mutual TLS.
* :mod:`secure_fl.errors` - the one exception tree.

Nothing heavy (torch) is imported eagerly.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
