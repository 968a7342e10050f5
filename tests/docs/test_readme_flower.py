"""The Flower blocks of README.md ("Secure aggregation and DP on Flower") run as written.

They need ``flwr`` (``pip install 'secure_fl[flower]'``), so README.md marks them
``<!-- readme-test: skip (... tests/docs/test_readme_flower.py ...) -->`` for the generic README
test, and this file runs them, each as a script of its own (a fresh interpreter and working
directory), skipping cleanly when flwr is absent. The block that starts Ray (``simulate``) runs
only with the slow tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr")

from test_readme import BLOCKS, Block, run_block  # noqa: E402

FLOWER_BLOCKS = [b for b in BLOCKS if "secure_fl.integrations.flower" in b.source]


def _param(block: Block) -> object:
    marks = [pytest.mark.slow] if "simulate(" in block.source else []
    return pytest.param(block, id=f"line-{block.line}", marks=marks)


def test_the_readme_has_the_flower_blocks_and_hands_them_to_this_file() -> None:
    sources = [b.source for b in FLOWER_BLOCKS]
    assert any("SecureAggregationWorkflow(" in s and "secure_fl_mod" in s for s in sources)
    assert any("simulate(" in s for s in sources)
    assert any("FlowerPrivacy(" in s and "audit_run(" in s for s in sources)
    for block in FLOWER_BLOCKS:
        assert block.mark == "skip" and "test_readme_flower.py" in block.reason, (
            f"README.md:{block.line}: a Flower block must be marked "
            "<!-- readme-test: skip (needs flwr; tests/docs/test_readme_flower.py runs it) -->"
        )


@pytest.mark.parametrize("block", [_param(b) for b in FLOWER_BLOCKS])
def test_readme_flower_block_runs(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path, "Flower")
