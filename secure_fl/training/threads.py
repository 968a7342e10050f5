"""How many CPU threads torch uses for a site's training and evaluation.

Torch sizes its intra-op thread pool from the machine, not from what this process may use or from
how many other processes share the cores. When several site processes (or other jobs) share a few
cores, every process spinning up a thread per core makes a round several times slower than one
thread per process (measured: a 3D-UNet round took 3.7x longer). The knob, in order of precedence:

1. an explicit ``threads`` (``SiteTrainer(threads=...)``; ``task.options.threads`` of the gRPC
   3D-UNet task :func:`secure_fl.training.remote.unet_site_task`);
2. the environment variable ``SECURE_FL_THREADS`` (for ``secure-fl simulate``, or any process);
3. the usable CPUs of this process divided by the sites sharing the machine (``sites_on_machine``,
   1 unless the caller knows better): the CPU affinity (``taskset``, cpusets) capped by the
   cgroup CPU quota (``docker --cpus``), at least 1.

Idle OpenMP threads spin by default, which is what hurts most when cores are shared;
``OMP_WAIT_POLICY=PASSIVE`` makes them sleep, but only if set before torch is first imported in
the process (``secure-fl site`` does so; :func:`secure_fl.transport.site.run_site`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from secure_fl.errors import ConfigError

#: Environment variable giving the number of torch threads (an integer >= 1).
ENV_VAR = "SECURE_FL_THREADS"

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

log = logging.getLogger("secure_fl.training")


def _cgroup_quota(path: Path = _CGROUP_CPU_MAX) -> int | None:
    """CPUs allowed by a cgroup v2 quota (``"200000 100000"`` -> 2), None when unlimited/unknown."""
    try:
        text = path.read_text().split()
    except OSError:
        return None
    if len(text) != 2 or text[0] == "max":
        return None
    try:
        quota, period = int(text[0]), int(text[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def usable_cpus(*, cgroup_cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup v2 CPU quota; >= 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_cpu_max)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def check_threads(value: object, where: str = "threads") -> int | None:
    """``value`` as a thread count (an int >= 1) or None. Errors: ConfigError naming ``where``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be an integer >= 1 or unset, got {value!r}")
    return value


def resolve_threads(threads: int | None = None, *, sites_on_machine: int = 1) -> int:
    """The thread count to use (see the module docstring for the precedence).

    Errors: ConfigError when ``threads``, ``sites_on_machine`` or ``SECURE_FL_THREADS`` is not an
    integer >= 1.
    """
    chosen = check_threads(threads)
    if chosen is not None:
        return chosen
    check_threads(sites_on_machine, "sites_on_machine")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            parsed = int(env)
        except ValueError:
            parsed = 0
        if parsed < 1:
            raise ConfigError(f"{ENV_VAR} must be an integer >= 1, got {env!r}")
        return parsed
    return max(1, usable_cpus() // sites_on_machine)


def set_torch_threads(
    threads: int | None = None, *, sites_on_machine: int = 1, who: str = "this process"
) -> int:
    """Set torch's intra-op thread count for this process (:func:`resolve_threads`); returns it.

    The setting is process-wide. Errors: ConfigError as :func:`resolve_threads`.
    """
    import torch

    count = resolve_threads(threads, sites_on_machine=sites_on_machine)
    if torch.get_num_threads() != count:
        log.info(
            "%s: torch threads %d (was %d; usable CPUs %d)",
            who,
            count,
            torch.get_num_threads(),
            usable_cpus(),
        )
        torch.set_num_threads(count)
    return count
