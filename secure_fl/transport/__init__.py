"""Deployment over gRPC: a federation server and site processes talking over mutual TLS.

The only package of secure_fl that imports grpc. Modules:

* :mod:`~secure_fl.transport.provision` - certificate authority, certificates, keys and configs.
* :mod:`~secure_fl.transport.config` - the server's and the sites' configuration files.
* :mod:`~secure_fl.transport.server` - the federation server: roster check on every call, round
  driver with deadlines, checkpoints, health checks, limits.
* :mod:`~secure_fl.transport.site` - a site process: joins, polls, runs its task, runs SecAgg.
* :mod:`~secure_fl.transport.tasks` - what a site computes each round (:class:`SiteTask`).
* :mod:`~secure_fl.transport.simulation` - the same round in process (the reference and baseline).
* :mod:`~secure_fl.transport.codegen` - regenerates ``_generated/`` from ``protocols/*.proto``.

The wire protocol is specified in ``protocols/federation.md``. Importing this package imports
neither grpc nor the generated code; the submodules that need them do.
"""

from secure_fl.transport.errors import RejectedError, TransportError

__all__ = ["RejectedError", "TransportError"]
