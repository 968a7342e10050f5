"""Configuration of the federation server and of a site: JSON files, parsed into frozen dataclasses.

``secure-fl provision`` writes one file per party; operators edit them. Relative paths are
resolved against the directory of the file. Unknown keys are refused (a typo must not silently
fall back to a default).

This module is the public entry point and re-exports the parts, which live in
:mod:`~secure_fl.transport.config_common` (constants, TLS/CKKS files, roster, limits),
:mod:`~secure_fl.transport.config_server` (``ServerConfig``, ``load_server_config``),
:mod:`~secure_fl.transport.config_site` (``SiteConfig``, ``SitePolicy``, ``load_site_config``)
and :mod:`~secure_fl.transport.config_section` (the JSON section reader).

Errors: every loader raises :class:`~secure_fl.errors.ConfigError` naming the field (as a dotted
path) and its allowed range.
"""

from __future__ import annotations

from secure_fl.transport.config_common import (
    AGGREGATIONS,
    CRASH_POINTS,
    FEDERATION_PROTOCOL,
    CkksFiles,
    Limits,
    RosterEntry,
    TlsFiles,
    valid_name,
)
from secure_fl.transport.config_server import (
    AggregationSettings,
    Deadlines,
    ModelSpec,
    ServerConfig,
    load_server_config,
    make_server_optimizer_from,
)
from secure_fl.transport.config_site import (
    DEFAULT_POLICY_AGGREGATIONS,
    SiteConfig,
    SitePolicy,
    TaskSpec,
    load_site_config,
    policy_to_json,
)

__all__ = [
    "AGGREGATIONS",
    "CRASH_POINTS",
    "DEFAULT_POLICY_AGGREGATIONS",
    "FEDERATION_PROTOCOL",
    "AggregationSettings",
    "CkksFiles",
    "Deadlines",
    "Limits",
    "ModelSpec",
    "RosterEntry",
    "ServerConfig",
    "SiteConfig",
    "SitePolicy",
    "TaskSpec",
    "TlsFiles",
    "load_server_config",
    "load_site_config",
    "make_server_optimizer_from",
    "policy_to_json",
    "valid_name",
]
