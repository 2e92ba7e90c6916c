"""A circuit breaker for the hot path's Redis calls.

Closed: calls go through; `failures` failures in a row open it. Open: calls
fail at once (a dead Redis costs microseconds, not a timeout, per request)
for `open_s`; then one call at a time may probe. When a call succeeds while
the breaker is open, or while decisions taken without Redis are owed
(`owe()`), the recovery hook (the outage journal's replay) runs in the
background, and the breaker closes only once it has finished: requests
decided while Redis was away are settled before Redis takes new ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from balance_gate import metrics

log = logging.getLogger(__name__)

Recovery = Callable[[], Awaitable[None]]


class CircuitBreaker:
    def __init__(self, failures: int, open_s: float) -> None:
        self._threshold = failures
        self._open_s = open_s
        self._failures = 0
        self._last_failed: int | None = None  # the pipeline of the last counted failure
        self._open_until: float | None = None  # None: closed
        self._probing = False
        self._owed = False
        self._recovering: asyncio.Task[None] | None = None
        self._recovery: Recovery | None = None
        metrics.REDIS_CIRCUIT_OPEN.set(0)

    def on_recovery(self, hook: Recovery) -> None:
        self._recovery = hook

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def admit(self) -> bool:
        """May a call be sent now? While open, one probe at a time after open_s."""
        if self._open_until is None:
            return True
        if self._probing or time.monotonic() < self._open_until:
            return False
        self._probing = True
        return True

    def owe(self) -> None:
        """A decision was taken without Redis: recover at the next answer."""
        self._owed = True

    def recover_now(self) -> None:
        """The outage journal is full: settle it without waiting for an answered call.

        It goes out as the probe while the circuit is open (admit), so a dead
        Redis is not asked more often than by probes.
        """
        if self._recovering is None and self.admit():
            self._recovering = asyncio.create_task(self._recover(), name="redis-recovery")

    def answered(self) -> None:
        """A call got its answer from Redis."""
        self._failures = 0
        if (self._open_until is not None or self._owed) and self._recovering is None:
            self._recovering = asyncio.create_task(self._recover(), name="redis-recovery")

    def failed(self, pipeline: int | None) -> None:
        """A call failed. Only sent calls count (None: refused by the open circuit),
        and a pipeline once: the calls of one failed pipeline are one Redis failure."""
        if pipeline is None or pipeline == self._last_failed:
            return
        self._last_failed = pipeline
        self._failures += 1
        if self._open_until is not None:
            if self._recovering is None:
                self._reopen()
        elif self._failures >= self._threshold:
            log.warning("Redis failed %d times in a row: circuit open", self._failures)
            self._reopen()

    async def wait_recovered(self) -> None:
        """For shutdown and tests: let a running recovery finish."""
        if self._recovering is not None:
            await asyncio.shield(self._recovering)

    async def _recover(self) -> None:
        try:
            if self._recovery is not None:
                await self._recovery()
        except Exception:
            log.exception("settling the outage journal failed; Redis stays fenced off")
            self._reopen()
            return
        finally:
            self._recovering = None
        self._owed = False
        if self._open_until is not None:
            self._open_until = None
            self._probing = False
            metrics.REDIS_CIRCUIT_OPEN.set(0)
            log.warning("Redis answers again: circuit closed")

    def _reopen(self) -> None:
        if self._open_until is None:
            metrics.REDIS_CIRCUIT_OPENED.inc()
        self._open_until = time.monotonic() + self._open_s
        self._probing = False
        metrics.REDIS_CIRCUIT_OPEN.set(1)
