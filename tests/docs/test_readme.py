"""Every ```python block of README.md runs as written.

Each block runs as a script in a fresh interpreter and a fresh temporary working directory, in the
order of the README, sharing nothing with the others (so every block carries its own imports). A block that needs something it cannot have is marked by an HTML comment on the line
just before its fence:

* ``<!-- readme-test: skip (reason) -->``: never run (the reason is required);
* ``<!-- readme-test: slow (reason) -->``: run only with the slow tests (``-m slow``), for a block
  that trains a model.

The quick tour, the SecAgg phase loop and the CKKS keys may be neither skipped nor slow: they are
what a newcomer copies first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*readme-test:\s*(skip|slow)\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")

#: Blocks that must run in the default suite, recognised by a line they contain.
PROTECTED = {
    "quick tour": 'aggregators.create("secagg+")',
    "SecAgg phase loop": "SecAggClient(",
    "CKKS keys": "from secure_fl.he import provision",
}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    source: str
    mark: str | None  # "skip", "slow" or None
    reason: str


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text``, with the readme-test mark just before each one.

    Errors: ValueError for an unclosed fence or a mark without a reason."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        lang, start = match.group(1), i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: unclosed code fence")
        body = "\n".join(lines[start + 1 : i]) + "\n"
        i += 1
        if lang != "python":
            continue
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        mark = _MARK.match(lines[before].strip()) if before >= 0 else None
        reason = (mark.group("reason") or "").strip() if mark else ""
        if mark and not reason:
            raise ValueError(f"README.md:{start + 1}: a readme-test mark needs a (reason)")
        blocks.append(Block(start + 1, body, mark.group(1) if mark else None, reason))
    return blocks


BLOCKS = python_blocks(README.read_text())


def _param(block: Block) -> object:
    marks: list[pytest.MarkDecorator] = []
    if block.mark == "slow":
        marks.append(pytest.mark.slow)
    elif block.mark == "skip":
        marks.append(pytest.mark.skip(reason=f"README.md:{block.line}: {block.reason}"))
    return pytest.param(block, id=f"line-{block.line}", marks=marks)


def run_block(block: Block, tmp_path: Path, what: str = "python") -> None:
    """Run ``block`` as a script of its own (a fresh interpreter, working directory and
    namespace), as a reader who pastes it into a file would run it; fail naming its README line."""
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.source)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "SECURE_FL_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (
        f"README.md: the {what} block at line {block.line} failed (line N of "
        f"{script.name} is README line {block.line} + N):\n{done.stderr[-6000:]}"
    )


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_python_block_runs(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path)


def test_readme_has_the_blocks_a_newcomer_copies_and_none_of_them_is_skipped() -> None:
    for what, needle in PROTECTED.items():
        found = [b for b in BLOCKS if needle in b.source]
        assert found, f"README.md has no {what} block (a python block containing {needle!r})"
        for b in found:
            assert b.mark is None, f"README.md:{b.line}: the {what} block must run by default"


def test_block_extraction_reads_marks_and_refuses_marks_without_reason() -> None:
    text = "\n".join(
        [
            "```python",
            "x = 1",
            "```",
            "<!-- readme-test: skip (needs BraTS) -->",
            "",
            "```python",
            "y = 2",
            "```",
            "```sh",
            "ls",
            "```",
            "<!-- readme-test: slow (trains) -->",
            "```python",
            "z = 3",
            "```",
        ]
    )
    got = python_blocks(text)
    assert [(b.line, b.mark, b.reason, b.source) for b in got] == [
        (1, None, "", "x = 1\n"),
        (6, "skip", "needs BraTS", "y = 2\n"),
        (13, "slow", "trains", "z = 3\n"),
    ]
    with pytest.raises(ValueError, match="needs a"):
        python_blocks("<!-- readme-test: skip -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="unclosed"):
        python_blocks("```python\npass\n")


@pytest.mark.parametrize(
    "path", sorted((README.parent / "configs").glob("*.*")), ids=lambda p: p.name
)
def test_example_configs_validate(path: Path) -> None:
    """The example configs the README names are valid; one that needs data the repository does
    not ship (a BraTS datalist) fails only on that, naming the key."""
    from secure_fl.errors import ConfigError
    from secure_fl.training import load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        assert "data.datalist: file not found" in str(exc), exc
    else:
        assert config.rounds >= 1 and config.strategies
