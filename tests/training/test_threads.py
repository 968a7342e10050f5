"""Torch thread counts: explicit > SECURE_FL_THREADS > usable CPUs // sites on the machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from secure_fl.errors import ConfigError
from secure_fl.training import threads
from secure_fl.training.threads import resolve_threads, set_torch_threads, usable_cpus


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_usable_cpus_follows_affinity_capped_by_the_cgroup_quota(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert usable_cpus(cgroup_cpu_max=quota) == _affinity()
    quota.write_text("50000 100000\n")  # half a CPU: still one thread
    assert usable_cpus(cgroup_cpu_max=quota) == 1
    quota.write_text(f"{(_affinity() + 3) * 100000} 100000\n")  # a quota above the affinity
    assert usable_cpus(cgroup_cpu_max=quota) == _affinity()
    assert usable_cpus(cgroup_cpu_max=tmp_path / "absent") == _affinity()


def test_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    assert resolve_threads() == 8
    assert resolve_threads(sites_on_machine=3) == 2
    assert resolve_threads(sites_on_machine=16) == 1
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert resolve_threads(sites_on_machine=4) == 3
    assert resolve_threads(5) == 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused_naming_the_knob(bad: object) -> None:
    with pytest.raises(ConfigError, match="threads"):
        resolve_threads(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0", "two", "-3"])
def test_a_bad_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(threads.ENV_VAR, bad)
    with pytest.raises(ConfigError, match=threads.ENV_VAR):
        resolve_threads()


def test_set_torch_threads_sets_the_process_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv(threads.ENV_VAR, "2")
    assert set_torch_threads() == 2 and torch.get_num_threads() == 2


def test_the_grpc_task_option_is_checked_first() -> None:
    from secure_fl.training.remote import unet_site_task

    with pytest.raises(ConfigError, match=r"task\.options\.threads"):
        unet_site_task("site-a", datalist="/nonexistent.json", threads=0)


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_a_site_process_makes_idle_openmp_threads_sleep_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, preset: str | None, expected: str
) -> None:
    from secure_fl.transport import site

    class _Runner:
        def __init__(self, config: object) -> None:
            self.policy = os.environ.get("OMP_WAIT_POLICY")

        def run(self) -> int:
            return 0 if self.policy == expected else 1

    monkeypatch.setenv("OMP_WAIT_POLICY", preset or "")  # records the value to restore
    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(site, "SiteRunner", _Runner)
    assert site.run_site(object()) == 0  # type: ignore[arg-type]
    assert os.environ["OMP_WAIT_POLICY"] == expected
