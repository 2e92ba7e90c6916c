"""The auto top-up worker: an asyncio task in every sidecar.

Triggers come from the debit scripts through one stream per shard, read with a
consumer group, so each trigger reaches one worker across all sidecars; the
settings row lock in Postgres and the pending top-ups make a second trigger for
the same dip charge nothing. A trigger is acknowledged only after it was
handled: a worker that dies leaves it pending, and another takes it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.exceptions import RedisError, ResponseError

from balance_gate import metrics
from balance_gate.flusher import consumer_name, streams_lost
from balance_gate.redis_store import RedisStore
from balance_gate.topups import TopUps

log = logging.getLogger(__name__)

_READ_BLOCK_MS = 200
_STALE_TRIGGER_MS = 60_000
_RECOVERY_EVERY_S = 15.0
_PENDING_AGE_S = 30.0


class TopUpWorker:
    def __init__(
        self, hot: RedisStore, topups: TopUps, *, retry_interval_s: float, concurrency: int
    ) -> None:
        self._hot = hot
        self._topups = topups
        self._retry_interval_s = retry_interval_s
        self._slots = asyncio.Semaphore(concurrency)
        self._batch = concurrency
        self.consumer = consumer_name()

    async def run(self, stop: asyncio.Event) -> None:
        groups_ready = False
        next_recovery = 0.0
        while not stop.is_set():
            try:
                if not groups_ready:
                    await self._hot.ensure_top_up_groups()
                    groups_ready = True
                await self.handle_new(_READ_BLOCK_MS)
                if time.monotonic() >= next_recovery:
                    await self.recover()
                    next_recovery = time.monotonic() + _RECOVERY_EVERY_S
            except ResponseError as exc:
                groups_ready = not streams_lost(exc)
                if groups_ready:
                    log.exception("top-up worker: unexpected Redis reply")
                    await _pause(stop, 1.0)
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("top_up_worker").inc()
                log.warning("top-up worker: Redis unavailable (%s)", exc)
                await _pause(stop, 1.0)
            except Exception:  # keep working: one bad trigger must not stop top-ups
                log.exception("top-up worker failed; retrying")
                await _pause(stop, 1.0)

    async def handle_new(self, block_ms: int | None) -> int:
        triggers = await self._hot.read_top_up_triggers(self.consumer, self._batch, block_ms)
        await asyncio.gather(*(self._handle(*trigger) for trigger in triggers))
        return len(triggers)

    async def recover(self) -> None:
        """Take over triggers of dead workers, and finish top-ups left pending."""
        stale = await self._hot.read_top_up_triggers(
            self.consumer, self._batch, None, stale_ms=_STALE_TRIGGER_MS
        )
        await asyncio.gather(*(self._handle(*trigger) for trigger in stale))
        pending = await self._topups.resolve_stale(_PENDING_AGE_S, self._retry_interval_s)
        metrics.TOP_UPS_PENDING.set(pending)
        metrics.TOP_UP_TRIGGERS_PENDING.set(await self._hot.top_up_triggers_waiting())

    async def _handle(self, shard: int, entry_id: str, account_id: str) -> None:
        async with self._slots:
            started = time.perf_counter()
            try:
                result = await self._topups.auto(account_id, self._retry_interval_s)
            except Exception:
                # Left unacknowledged: taken over and retried after _STALE_TRIGGER_MS.
                log.exception("top-up trigger for %r failed", account_id)
                return
            metrics.TOP_UPS.labels(metric_result(result)).inc()
            metrics.TOP_UP_SECONDS.observe(time.perf_counter() - started)
            await self._hot.ack_top_up_trigger(shard, entry_id)


# Results that are label values as they are; anything else is a decline code
# from the gateway, which could be any string: counted as "declined".
_KNOWN_RESULTS = frozenset(
    {
        "succeeded", "network_error", "daily_cap", "monthly_cap", "paused", "disabled",
        "pending_covers", "above_threshold", "no_payment_method", "fx_rate_missing",
        "not_loaded", "gateway_rejected", "charge_over_limit",
    }
)  # fmt: skip


def metric_result(result: str) -> str:
    return result if result in _KNOWN_RESULTS else "declined"


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
