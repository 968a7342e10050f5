"""Print, after a benchmark run, each measurement as a ratio to its group's baseline.

The baseline of a group is the benchmark whose name contains ``baseline`` (the plain sum, or the
Mersenne-Twister mask generation). Ratios are taken within one run only: this machine is shared and
noisy, so absolute numbers from different runs are not comparable.
"""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list[Any]] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("ratios against the baseline measured in the same run (median seconds):")
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if "baseline" in b.name), None)
        write(f"[{group}]")
        for bench in sorted(benches, key=lambda b: b.stats.median):
            med = bench.stats.median
            ratio = f"{med / base.stats.median:8.2f}x" if base is not None else "        "
            extra = bench.extra_info
            info = ", ".join(f"{k}={v}" for k, v in sorted(extra.items()))
            write(f"  {bench.name:<60} {med * 1e3:10.1f} ms {ratio}  {info}")
