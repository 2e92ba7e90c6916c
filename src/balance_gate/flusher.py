"""Moves usage events from the Redis streams into Postgres, exactly once.

For each batch: read (consumer group), insert into Postgres skipping request
ids already there, commit, then acknowledge in Redis, which also takes the
amounts out of each account's `unflushed` total. A crash between commit and
acknowledgement leaves the entries pending; whoever takes them over inserts
nothing twice (primary key) and acknowledges them, and only the first
acknowledgement of an entry touches `unflushed`.

A batch the ledger refuses because of what one event holds (a data error:
SQLSTATE class 22, 23 or P0) is recorded again an event at a time; an event the
ledger still refuses alone is a poison event: it is set aside in
usage_dead_letters with the reason, undone in Redis like a duplicate, and
counted (issue 13 item 3). Every other event keeps flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Sequence

import asyncpg
from redis.exceptions import RedisError, ResponseError

from balance_gate import metrics
from balance_gate.constants import SHARD_COUNT
from balance_gate.postgres_store import (
    Connection,
    EntryKey,
    PostgresStore,
    UsageRecorded,
    entry_key,
)
from balance_gate.redis_store import RedisStore, StreamEntry

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 2.0
# SQLSTATE classes that blame the data, not the connection or the moment: data
# exceptions, constraint violations, PL/pgSQL RAISE (burn_down's refusal).
_POISON_CLASSES = ("22", "23", "P0")


def refused_for_its_data(exc: asyncpg.PostgresError) -> bool:
    """Whether recording failed because of what the events hold (so retrying
    the same batch can never succeed), not because Postgres was unreachable or busy."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate[:2] in _POISON_CLASSES


def streams_lost(exc: ResponseError) -> bool:
    """NOGROUP: a stream or its group is missing. UNBLOCKED: a stream we were
    blocked on was deleted. Both mean Redis lost its state: recreate the groups.
    (In a pipeline, redis-py puts the reply after "Command # n (...) caused error:".)"""
    message = str(exc)
    return "NOGROUP" in message or "UNBLOCKED" in message


def given_back(
    entries: Sequence[StreamEntry], recorded: UsageRecorded, set_aside: frozenset[EntryKey]
) -> dict[EntryKey, int]:
    """What Redis gives back to each entry's hot balance, so that it follows the
    ledger: the whole amount of an entry the ledger does not hold (a duplicate, a
    set-aside event), the difference of one it booked at another amount."""
    give_back = {key: amount for key, amount in recorded.repriced.items() if amount}
    for entry in entries:
        key = (entry.shard, entry.entry_id)
        if key in recorded.duplicates or key in set_aside:
            give_back[key] = entry.event.amount_micros
    return give_back


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class UsageFlusher:
    def __init__(
        self,
        hot: RedisStore,
        pg: PostgresStore,
        *,
        batch_size: int,
        block_ms: int,
        claim_idle_ms: int,
        interval_ms: int = 0,
        stats_interval_ms: int,
    ) -> None:
        self._hot = hot
        self._pg = pg
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._interval_s = interval_ms / 1000
        self._claim_idle_ms = claim_idle_ms
        self._stats_interval_s = stats_interval_ms / 1000
        self.consumer = consumer_name()
        # After a failed flush, this consumer's read-but-unrecorded entries go first.
        self._own_pending = False
        # Usage events this flusher set aside in usage_dead_letters (audit, rebuild).
        self.set_aside_count = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until `stop` is set, then drain what is left and return."""
        backoff_s = 0.05
        next_claim = next_stats = 0.0
        groups_ready = False
        while not stop.is_set():
            try:
                if not groups_ready:
                    await self._hot.ensure_usage_groups()
                    groups_ready = True
                flushed = await self.flush_once(self._block_ms)
                if 0 < flushed < self._batch_size and self._interval_s:
                    # Let usage gather: one flush of many events costs far less CPU
                    # than many flushes of a few (docs/performance.md).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._interval_s)
                now = time.monotonic()
                if now >= next_claim:
                    await self.claim_stale()
                    next_claim = now + self._claim_idle_ms / 1000
                backoff_s = 0.05
            except ResponseError as exc:
                if streams_lost(exc):
                    log.warning("usage streams or groups are gone (Redis flushed?); recreating")
                    groups_ready = False
                    continue
                # Unexpected, but the flusher must outlive any one reply.
                metrics.REDIS_ERRORS.labels("flusher").inc()
                backoff_s = await self._back_off(stop, backoff_s, "Redis", exc)
            except RedisError as exc:
                metrics.REDIS_ERRORS.labels("flusher").inc()
                backoff_s = await self._back_off(stop, backoff_s, "Redis", exc)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                # OSError: a refused or reset connection, or a timeout; redis-py wraps
                # its own in RedisError, so these come from Postgres.
                metrics.POSTGRES_ERRORS.labels("flusher").inc()
                backoff_s = await self._back_off(stop, backoff_s, "Postgres", exc)
            except Exception as exc:
                # Usage must keep flowing whatever one batch met: log it and go on.
                log.exception("usage flush failed unexpectedly")
                backoff_s = await self._back_off(stop, backoff_s, "unexpected", exc)
            # Even when flushes fail: the backlog and lag gauges are what alerts on it.
            if time.monotonic() >= next_stats:
                await self._refresh_stats_quietly()
                next_stats = time.monotonic() + self._stats_interval_s
        try:
            await self.drain()
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Nothing is lost: unread events stay in the streams, read ones stay
            # pending, and the next flusher records them.
            log.warning("final usage flush failed (%s); the next start records the rest", exc)

    async def _back_off(
        self, stop: asyncio.Event, delay_s: float, what: str, exc: Exception
    ) -> float:
        log.warning("usage flush failed (%s: %s); retrying in %.2fs", what, exc, delay_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay_s)
        return min(delay_s * 2, _MAX_BACKOFF_S)

    async def drain(self, max_batches: int = 1_000) -> int:
        """Flush without waiting until the streams have nothing new (bounded)."""
        flushed = 0
        for _ in range(max_batches):
            n = await self.flush_once(block_ms=None)
            flushed += n
            if n == 0:
                break
        return flushed

    async def flush_once(self, block_ms: int | None) -> int:
        # COUNT applies per stream: a backlog over many shards can return up to
        # SHARD_COUNT * batch_size entries, so Postgres gets them in chunks.
        own_pending = self._own_pending
        entries = await self._hot.read_usage(
            self.consumer, self._batch_size, block_ms, own_pending=own_pending
        )
        if own_pending and not entries:
            self._own_pending = False
            return await self.flush_once(block_ms)
        self._own_pending = True  # until recorded: a failure below leaves them pending
        for start in range(0, len(entries), self._batch_size):
            chunk = entries[start : start + self._batch_size]
            async with self._pg.shard_lock({e.shard for e in chunk}, exclusive=False) as conn:
                await self._record(conn, chunk)
        self._own_pending = own_pending  # still draining our pending ones, or done
        return len(entries)

    async def claim_stale(self) -> int:
        """Take over entries that a consumer read and then went silent on."""
        taken = 0
        for shard in range(SHARD_COUNT):
            entries = await self._hot.claim_stale_usage(
                shard, self.consumer, self._claim_idle_ms, self._batch_size
            )
            if entries:
                async with self._pg.shard_lock([shard], exclusive=False) as conn:
                    taken += await self._record(conn, entries)
        return taken

    async def record_pending_locked(self, conn: Connection, shard: int) -> int:
        """Record and acknowledge every entry of the shard read by anyone but not acknowledged.

        For a rebuild: the caller holds the shard's lock exclusively (on `conn`),
        so no flusher is between its commit and its acknowledgement.
        """
        recorded = 0
        while entries := await self._hot.claim_stale_usage(
            shard, self.consumer, 0, self._batch_size
        ):
            recorded += await self._record(conn, entries)
        return recorded

    async def _record(self, conn: Connection, entries: Sequence[StreamEntry]) -> int:
        try:
            recorded = await self._pg.record_usage(conn, [entry.event for entry in entries])
            set_aside: frozenset[EntryKey] = frozenset()
        except asyncpg.PostgresError as exc:
            if not refused_for_its_data(exc):
                raise
            log.warning("usage batch refused (%s); recording it an event at a time", exc)
            recorded, set_aside = await self._record_one_by_one(conn, entries)
        by_shard: dict[int, list[StreamEntry]] = defaultdict(list)
        for entry in entries:
            by_shard[entry.shard].append(entry)
        give_back = given_back(entries, recorded, set_aside)
        # Called together, the acknowledgements share one pipeline (ScriptBatcher).
        await asyncio.gather(
            *(
                self._hot.ack_usage(shard, shard_entries, give_back)
                for shard, shard_entries in by_shard.items()
            )
        )
        metrics.USAGE_FLUSHED.inc(recorded.inserted)
        if recorded.duplicates:
            metrics.USAGE_DUPLICATES_REVERTED.inc(len(recorded.duplicates))
            log.warning(
                "%d usage events repeated requests the ledger already had; reverted in Redis",
                len(recorded.duplicates),
            )
        if recorded.repriced:
            metrics.USAGE_REPRICED.inc(len(recorded.repriced))
            log.warning(
                "%d usage events booked against the ledger's authorization of their request"
                " (decided again by Redis); the difference corrected in Redis",
                len(recorded.repriced),
            )
        return len(entries)

    async def _record_one_by_one(
        self, conn: Connection, entries: Sequence[StreamEntry]
    ) -> tuple[UsageRecorded, frozenset[EntryKey]]:
        """Each event in its own transaction, in stream order; those the ledger
        refuses alone are set aside. A failure of any other kind is raised: the
        batch stays pending, and what was recorded is not recorded twice."""
        inserted = 0
        duplicates: set[EntryKey] = set()
        repriced: dict[EntryKey, int] = {}
        set_aside: set[EntryKey] = set()
        for entry in entries:
            try:
                one = await self._pg.record_usage(conn, [entry.event])
            except asyncpg.PostgresError as exc:
                if not refused_for_its_data(exc):
                    raise
                await self._set_aside(conn, entry, exc)
                set_aside.add(entry_key(entry.event))
                continue
            inserted += one.inserted
            duplicates |= one.duplicates
            repriced.update(one.repriced)
        return UsageRecorded(inserted, frozenset(duplicates), repriced), frozenset(set_aside)

    async def _set_aside(
        self, conn: Connection, entry: StreamEntry, exc: asyncpg.PostgresError
    ) -> None:
        event = entry.event
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if await self._pg.set_aside_usage(conn, event, sqlstate, str(exc)):
            metrics.USAGE_DEAD_LETTERS.inc()
            self.set_aside_count += 1
        log.error(
            "usage event set aside in usage_dead_letters and undone in Redis: account %r,"
            " request %r, %s of %d micros (shard %d, entry %s): %s",
            event.account_id,
            event.request_id,
            event.kind,
            event.amount_micros,
            entry.shard,
            entry.entry_id,
            exc,
        )

    async def _refresh_stats_quietly(self) -> None:
        """refresh_stats, whose own failure (Redis down) only waits for the next turn."""
        try:
            await self.refresh_stats()
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("flusher").inc()
            log.debug("usage stats not refreshed: %s", exc)

    async def refresh_stats(self) -> None:
        backlog = await self._hot.usage_backlog_by_shard()
        metrics.USAGE_BACKLOG.set(backlog.waiting)
        metrics.USAGE_BACKLOG_FULLEST_SHARD.set(backlog.fullest_shard)
        oldest_ms = backlog.oldest_ms
        lag_s = 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        metrics.USAGE_FLUSH_LAG.set(lag_s)
