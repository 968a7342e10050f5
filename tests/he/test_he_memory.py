"""Large updates stream through in bounded memory (slow: a 4.8 M-parameter round in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_SCRIPT = r"""
import json, sys
import numpy as np
from secure_fl.aggregators.ckks import CKKSAggregator

size, n = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
updates = {f"s{i}": [(0.01 * rng.standard_normal(size)).astype(np.float32)] for i in range(n)}
agg = CKKSAggregator()
agg.aggregate({f"s{i}": [np.zeros(10, np.float32)] for i in range(n)})  # warm up TenSEAL

def status_mb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) / 1024

before = status_mb("VmRSS")
report = agg.aggregate(updates).report
# VmHWM, not ru_maxrss: Linux carries the parent's RSS high-water mark into ru_maxrss across the
# (v)fork + exec of this subprocess, so a large pytest process made this test fail spuriously.
peak = status_mb("VmHWM")
print(json.dumps({"before": before, "peak": peak, "rel": report["max_rel_error"],
                  "expansion": report["expansion"], "pending": report["peak_pending_chunks"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_4_8m_round_memory_is_plaintext_plus_a_few_chunks() -> None:
    size, n = 4_800_000, 3
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(size), str(n)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    # plaintext the aggregator must hold anyway: n float64 flat vectors (prepare), the float64
    # mean and the float32 result
    plaintext_mb = (8 * size * (n + 1) + 4 * size) / 2**20
    # ciphertexts of one chunk (64 x 128 KiB, a few copies); holding every site's ciphertexts
    # instead would add about 3 x 150 MB here
    allowance_mb = 100
    assert stats["peak"] - stats["before"] < plaintext_mb + allowance_mb, stats
    assert stats["pending"] == 1
    assert stats["rel"] < 1e-6
    assert stats["expansion"] < 8.0
