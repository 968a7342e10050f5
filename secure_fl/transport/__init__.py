"""Deployment over gRPC: a federation server and site processes talking over mutual TLS.

The only package of secure_fl that imports grpc. Modules:

* :mod:`~secure_fl.transport.provision` - certificate authority, certificates, keys and configs
  (:mod:`~.pki` the certificates, :mod:`~.provision_unet` ``--task unet``,
  :mod:`~.provision_privacy` ``--privacy site`` and every site's privacy floor).
* :mod:`~secure_fl.transport.config` - the server's and the sites' configuration files.
* :mod:`~secure_fl.transport.server` - the federation server: a thin gRPC shell
  (:mod:`~.server_service`, :mod:`~.server_uploads` the handlers, :mod:`~.server_host`) over the
  sans-IO coordinator (:mod:`~.coordinator`, :mod:`~.coordinator_tick`,
  :mod:`~.coordinator_steps`, :mod:`~.coordinator_finish`; its stage table :mod:`~.stages`;
  the per-protocol steps :mod:`~.server_rounds`); checkpoints (:mod:`~.checkpoint`), limits
  (:mod:`~.limits`), DP ledger and noise (:mod:`~.privacy`).
* :mod:`~secure_fl.transport.site` - a site process: a gRPC shell over the sans-IO driver
  (:mod:`~.site_driver`, :mod:`~.site_round`, :mod:`~.site_replies`, :mod:`~.site_model`), whose
  SecAgg / CKKS steps (:mod:`~.site_secagg`, :mod:`~.site_ckks`) run the round layer's site halves
  (:mod:`secure_fl.rounds`); its policy (:mod:`~.policy`), privacy floor (:mod:`~.privacy_site`),
  DP round record (:mod:`~.site_dp`) and replay guards (:mod:`~.replay`).
* :mod:`~secure_fl.transport.tasks` - what a site computes each round (:class:`SiteTask`).
* :mod:`~secure_fl.transport.simulation` - the same round in process (the reference and baseline).
* :mod:`~secure_fl.transport.tls`, :mod:`~.logs`, :mod:`~.chunks`, :mod:`~.tensors`,
  :mod:`~.convert`, :mod:`~.ckks`, :mod:`~.rounds` - mutual TLS, logs, chunk streams, the tensors
  format, protobuf conversions, CKKS payloads, shared round helpers.
* :mod:`~secure_fl.transport.codegen` - regenerates ``_generated/`` from ``protocols/*.proto``.

The wire protocol is specified in ``protocols/federation.md``. Importing this package imports
neither grpc nor the generated code; the submodules that need them do.
"""

from secure_fl.transport.errors import RejectedError, TransportError

__all__ = ["RejectedError", "TransportError"]
