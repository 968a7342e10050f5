"""Progress bars: drawn only when asked or when stderr is a terminal, never under pytest by default."""

from __future__ import annotations

import io
import sys

import pytest

from secure_fl.training import progress
from secure_fl.training.progress import Progress, progress_enabled, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_explicit_choice_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.ENV_VAR, "1")
    assert progress_enabled(False) is False
    monkeypatch.setenv(progress.ENV_VAR, "0")
    assert progress_enabled(True) is True


def test_quiet_under_pytest_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert "PYTEST_CURRENT_TEST" in __import__("os").environ
    assert progress_enabled() is False


@pytest.mark.parametrize(("tty", "expected"), [(True, True), (False, False)])
def test_auto_follows_whether_stderr_is_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tty: bool, expected: bool
) -> None:
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setattr(sys, "stderr", _Tty() if tty else io.StringIO())
    assert progress_enabled() is expected


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("on", True), ("0", False), ("false", False)]
)
def test_environment_variable_forces(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv(progress.ENV_VAR, value)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert progress_enabled() is expected


def test_an_enabled_bar_writes_to_stderr_and_a_disabled_one_writes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Progress(total=3, desc="site-x: train round 1", unit="step", enabled=True) as bar:
        for _ in range(3):
            bar.update(loss=0.25)
    captured = capsys.readouterr()
    assert "site-x: train round 1" in captured.err and captured.out == ""

    with Progress(total=3, desc="silent", enabled=None) as bar:  # auto: quiet under pytest
        bar.update(loss=1.0)
    assert list(track(range(4), desc="silent too")) == [0, 1, 2, 3]
    assert capsys.readouterr() == ("", "")


def test_track_yields_every_item_and_closes_on_break(capsys: pytest.CaptureFixture[str]) -> None:
    items = iter(["a", "b", "c"])
    seen = []
    gen = track(items, total=3, desc="cases", unit="case", enabled=True)
    for item in gen:
        seen.append(item)
        if item == "b":
            break
    gen.close()
    assert seen == ["a", "b"]
    assert "cases" in capsys.readouterr().err
