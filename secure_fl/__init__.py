"""secure_fl: privacy-preserving federated learning for medical imaging.

The first names a user needs:

* :func:`secure_fl.aggregators.create` - a plain, SecAgg or SecAgg+ aggregator behind one interface.
* :mod:`secure_fl.secagg` - the sans-IO SecAgg / SecAgg+ protocol cores and the in-process harness.
* :mod:`secure_fl.errors` - the one exception tree.

Nothing heavy (torch) is imported eagerly.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
