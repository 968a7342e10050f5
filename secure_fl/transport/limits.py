"""Per-site admission control: a token bucket (rate) and a cap on concurrent calls.

One misbehaving site cannot exhaust the server: each site gets at most ``per_site_concurrency``
calls in flight and ``rate_per_s`` calls per second on average (bursts of ``burst``); beyond that
its calls are refused at once with RESOURCE_EXHAUSTED, without touching the round. gRPC itself
bounds the total (``maximum_concurrent_rpcs``), the message size and the HTTP/2 streams per
connection (see :mod:`secure_fl.transport.server`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from secure_fl.transport.errors import RejectedError


class SiteLimiter:
    """Rate and concurrency limits keyed by site name. Thread-safe."""

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._concurrency = concurrency
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, float]] = {}
        self._active: dict[str, int] = {}

    @contextmanager
    def admit(self, site: str) -> Iterator[None]:
        """Hold one call slot of ``site`` for the duration of the block.

        Errors: RejectedError(RESOURCE_EXHAUSTED) when the site is over its rate or concurrency limit.
        """
        with self._lock:
            now = self._clock()
            tokens, last = self._tokens.get(site, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if tokens < 1.0:
                self._tokens[site] = (tokens, now)
                raise RejectedError(
                    "RESOURCE_EXHAUSTED",
                    f"site {site} exceeds {self._rate:g} calls per second",
                )
            active = self._active.get(site, 0)
            if active >= self._concurrency:
                self._tokens[site] = (tokens, now)
                raise RejectedError(
                    "RESOURCE_EXHAUSTED",
                    f"site {site} already has {active} calls in flight (limit {self._concurrency})",
                )
            self._tokens[site] = (tokens - 1.0, now)
            self._active[site] = active + 1
        try:
            yield
        finally:
            with self._lock:
                self._active[site] -= 1
