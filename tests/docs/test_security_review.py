"""The security review (protocols/security.md) cites tests by name: every one must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_cited_in_the_security_review_exists() -> None:
    review = (ROOT / "protocols" / "security.md").read_text()
    cited = set(re.findall(r"\b(test_[a-z0-9_]+)\b", review))
    assert cited, "the review cites no test"
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"def (test_[a-z0-9_]+)\(", sources))
    files = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    missing = sorted(name for name in cited if name not in defined and name not in files)
    assert not missing, f"protocols/security.md cites tests that do not exist: {missing}"
