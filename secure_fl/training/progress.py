"""Progress bars (tqdm) for local training, caching and evaluation, quiet unless someone watches.

One decision, :func:`progress_enabled`, says whether a bar is drawn: an explicit ``True`` / ``False``
wins; otherwise the environment variable ``SECURE_FL_PROGRESS`` (``0`` / ``1``); otherwise never
under pytest, and only when stderr is a terminal (a log file, a pipe or a CI job gets no bar and
no carriage-return noise). Bars go to stderr and are removed when they finish, so the one-line
summary of each round stays the lasting output.

A bar shows only what the caller gives it: callers must not pass a statistic computed on the
training patients without noise (such as the training loss) when the run is under differential
privacy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: Environment variable that forces progress bars on (``1``) or off (``0``).
ENV_VAR = "SECURE_FL_PROGRESS"

#: Seconds between redraws of a bar.
MIN_INTERVAL_S = 0.5

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether to draw a progress bar.

    ``enabled`` True/False decides. None (auto): ``SECURE_FL_PROGRESS`` when set to one of
    ``1/true/yes/on`` or ``0/false/no/off`` (anything else is ignored); else False under pytest
    (``PYTEST_CURRENT_TEST`` is set); else whether stderr is a terminal.
    """
    if enabled is not None:
        return bool(enabled)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in _TRUE:
        return True
    if forced in _FALSE:
        return False
    if "PYTEST_CURRENT_TEST" in os.environ:
        return False
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class Progress:
    """A progress bar of ``total`` units (None: unknown), or nothing at all when disabled.

    Use as a context manager; :meth:`update` advances it and may set short ``postfix`` values
    (shown after the bar). When disabled nothing is imported, written or allocated per update.
    """

    def __init__(
        self,
        *,
        total: int | None,
        desc: str,
        unit: str = "it",
        enabled: bool | None = None,
    ) -> None:
        self.enabled = progress_enabled(enabled)
        self._bar: Any = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                leave=False,
                dynamic_ncols=True,
                mininterval=MIN_INTERVAL_S,
                file=sys.stderr,
            )

    def update(self, n: int = 1, **postfix: float | str) -> None:
        """Advance by ``n`` units; ``postfix`` replaces the values shown after the bar."""
        if self._bar is None:
            return
        if postfix:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def track(
    items: Iterable[T],
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    enabled: bool | None = None,
) -> Iterator[T]:
    """Yield ``items`` unchanged, advancing a :class:`Progress` bar by one per item.

    ``total`` defaults to ``len(items)`` when it has one. The bar is closed when the iteration
    ends, is abandoned or raises.
    """
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total=total, desc=desc, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()
