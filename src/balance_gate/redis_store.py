"""Redis, the hot state: one Lua script per money decision, one round trip each.

Scripts live in balance_gate/lua and are called by EVALSHA (redis-py's Script
object loads them again after a NOSCRIPT, e.g. when Redis restarted).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from balance_gate.constants import (
    CREDIT_MARKER_TTL_SECONDS,
    MAX_SAFE_MICROS,
    SHARD_COUNT,
    TOP_UP_GROUP,
    USAGE_GROUP,
)
from balance_gate.keys import Keys, credit_line_fields
from balance_gate.postgres_store import UsageEvent
from balance_gate.redis_client import execute_pipeline, is_cluster

_KIND = {b"a": "authorize", b"s": "settle"}


# Scripts that call the lease helpers get lib/leases.lua in front of them, and
# those that read or write request records lib/records.lua.
_NEEDS_LEASE_LIB = frozenset({"authorize", "lease_take", "lease_report"})
_NEEDS_RECORD_LIB = frozenset({"authorize", "settle", "lease_report", "void_attempt"})


def script_source(name: str) -> str:
    """The exact source Redis runs for a script (make bench loads it too)."""
    lua = resources.files("balance_gate").joinpath("lua")
    parts = [lua.joinpath(f"{name}.lua").read_text("utf-8")]
    if name in _NEEDS_RECORD_LIB:
        parts.insert(0, lua.joinpath("lib", "records.lua").read_text("utf-8"))
    if name in _NEEDS_LEASE_LIB:
        parts.insert(0, lua.joinpath("lib", "leases.lua").read_text("utf-8"))
    return "\n".join(parts)


class VoidResult:
    """Codes of lua/void_attempt.lua."""

    DONE: Final = 0
    FENCED: Final = 1
    KEPT: Final = 2
    NOT_LOADED: Final = 3
    UNDONE: Final = 4


class FieldsWritten(IntEnum):
    """Answers of lua/set_fields.lua."""

    NOT_LOADED = 0
    SET = 1
    RECALLED = 2  # set, and it was a cut: the account's leases are recalled


@dataclass(frozen=True, slots=True)
class ScriptResult:
    code: int
    balance_micros: int
    # Settle: the delta; sync_account: the correction applied; otherwise 0.
    value: int = 0
    # Authorize and Settle: this request_id was already decided/settled.
    replayed: bool = False
    # Authorize: allowed, and under the warning level with no top-up coming.
    low_balance: bool = False


@dataclass(frozen=True, slots=True)
class HotAccount:
    balance_micros: int  # what the customer holds: includes money leased to sidecars
    unflushed_micros: int
    status: str
    leased_micros: int = 0


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    granted_micros: int  # -1: the account is not in Redis
    balance_micros: int  # balance + leased after the grant
    held_micros: int  # this holder's whole lease now
    # The credit line's stop-loss (C4) as the account hash holds it: sl_at (None: no
    # stop-loss) and sl_caps ("|cap|cap|", '' : none).
    stop_at_micros: int | None = None
    stop_caps: str = ""


@dataclass(frozen=True, slots=True)
class LeaseReport:
    balance_micros: int  # balance + leased after the report
    held_micros: int  # this holder's lease as Redis now counts it
    recall: bool  # another sidecar needs the money: return the lease
    duplicates: tuple[str, ...]  # request ids already decided elsewhere: not charged


@dataclass(frozen=True, slots=True)
class LeasedUse:
    request_id: str
    amount_micros: int
    capability: str


@dataclass(frozen=True, slots=True)
class UsageBacklog:
    waiting: int  # events in all usage streams (not yet in Postgres)
    fullest_shard: int  # events in the fullest stream: the one usage_backlog_max bounds
    oldest_ms: int | None  # Redis ms timestamp of the oldest event


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """A usage event as read from a shard's stream, not yet acknowledged."""

    shard: int
    entry_id: str
    event: UsageEvent


class HotUnavailable(Exception):
    """A hot-path script call failed or timed out.

    pipeline: the number of the pipeline that carried the call, None if it was
    never sent. A sent call may have run: its outcome is unknown. Calls of one
    pipeline fail together, and count as one failure of Redis. attempt: the
    Authorize attempt's token (set by the gate), which its void names.
    """

    def __init__(self, message: str, *, pipeline: int | None) -> None:
        super().__init__(message)
        self.pipeline = pipeline
        self.attempt = ""

    @property
    def sent(self) -> bool:
        return self.pipeline is not None


_pipelines = itertools.count(1)  # numbers the pipelines of every batcher


class Call:
    __slots__ = ("args", "keys", "pipeline", "reply")

    def __init__(
        self, keys: Sequence[str], args: Sequence[str], reply: asyncio.Future[Any]
    ) -> None:
        self.keys = keys
        self.args = args
        self.reply = reply
        self.pipeline: int | None = None  # set when sent

    async def result(self) -> Any:
        """The reply, or HotUnavailable when its pipeline failed or timed out.

        No timer per call: the pipeline has the deadline (ScriptBatcher), and
        time spent queued here is bounded by the caller's own gRPC deadline (a
        cancelled call is never sent).
        """
        try:
            return await self.reply
        except TimeoutError:
            raise HotUnavailable("redis did not answer in time", pipeline=self.pipeline) from None
        except (RedisError, OSError) as exc:
            raise HotUnavailable(
                f"redis failed: {type(exc).__name__}", pipeline=self.pipeline
            ) from exc


class ScriptBatcher:
    """Sends calls of one script to Redis in pipelines, one pipeline at a time.

    Each call stays one EVALSHA, atomic for its account; only round trips are
    shared. While a pipeline awaits its replies, new calls queue, and the next
    pipeline takes all of them: at low load a call goes out at once, under
    load batches grow with the load, so the socket writes, reads and
    event-loop wake-ups per call fall as the load rises. (Batching by event
    loop tick alone gave ~1.4 calls per batch: grpc.aio hands over requests
    one per tick. One pipeline in flight gave ~3 and +35% throughput, two
    gave ~1.6: docs/performance.md.)

    A batch that meets a Redis without the script (NOSCRIPT after a restart)
    loads it and sends the refused calls again; re-sending is safe because
    every script de-duplicates by request id.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        source: str,
        max_batch: int,
        max_in_flight: int = 1,
        timeout_s: float | None = None,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s  # a pipeline unanswered this long fails (hot path)
        self._source = source
        self._sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[Call] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, keys: Sequence[str], args: Sequence[str]) -> Call:
        loop = asyncio.get_running_loop()
        call = Call(keys, args, loop.create_future())
        self._queue.append(call)
        self._schedule(loop)
        return call

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_scheduled and len(self._sending) < self._max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # after the calls made in this tick

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queue:
            return
        # Calls whose callers gave up (timed out) are never sent.
        batch = [call for call in self._queue[: self._max_batch] if not call.reply.done()]
        del self._queue[: self._max_batch]
        if not batch:
            if self._queue:
                self._schedule(asyncio.get_running_loop())
            return
        number = next(_pipelines)
        for call in batch:
            call.pipeline = number
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)  # a reference until it is done, and the in-flight count
        task.add_done_callback(self._sent)
        if self._queue:
            self._schedule(asyncio.get_running_loop())

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._queue:
            self._schedule(asyncio.get_running_loop())

    async def _send(self, batch: list[Call]) -> None:
        try:
            replies = await self._execute(batch)
            refused = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if refused:
                await self._client.script_load(self._source)
                again = await self._execute([batch[i] for i in refused])
                for i, reply in zip(refused, again, strict=True):
                    replies[i] = reply
        except asyncio.CancelledError:
            for call in batch:
                call.reply.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
            for call in batch:
                if not call.reply.done():
                    call.reply.set_exception(exc)
            return
        for call, reply in zip(batch, replies, strict=True):
            waiting = call.reply
            if waiting.done():  # the caller gave up (cancelled)
                continue
            if isinstance(reply, Exception):
                waiting.set_exception(reply)
            else:
                waiting.set_result(reply)

    async def _execute(self, batch: list[Call]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            # Not pipe.evalsha: redis-py's cluster pipeline refuses that method, but
            # routes the raw command by its keys (all in one slot: keys.py).
            pipe.execute_command("EVALSHA", self._sha, len(call.keys), *call.keys, *call.args)
        # Abandoning a pipeline drops its connection (redis-py disconnects on
        # cancellation), so the next one does not queue behind a dead Redis.
        return await asyncio.wait_for(
            execute_pipeline(self._client, pipe, raise_on_error=False), self._timeout_s
        )


class RedisStore:
    def __init__(
        self,
        client: aioredis.Redis,
        key_prefix: str,
        request_ttl_seconds: int,
        trigger_ttl_seconds: int = 600,
        batch_max: int = 256,
        *,
        call_timeout_s: float = 1.0,
        backlog_max: int = 20_000,
        low_balance_micros: int = 0,
    ) -> None:
        self.client = client
        self._backlog_max = str(backlog_max)
        self._low_balance = str(low_balance_micros)
        self.keys = Keys(key_prefix)
        self._request_ttl = str(request_ttl_seconds)
        self._trigger_ttl = str(trigger_ttl_seconds)
        self._authorize = ScriptBatcher(
            client, script_source("authorize"), batch_max, timeout_s=call_timeout_s
        )
        self._settle = ScriptBatcher(
            client, script_source("settle"), batch_max, timeout_s=call_timeout_s
        )
        self._apply_credit: AsyncScript = client.register_script(script_source("apply_credit"))
        self._sync: AsyncScript = client.register_script(script_source("sync_account"))
        self._ack = ScriptBatcher(client, script_source("ack_usage"), batch_max)
        self._set_fields: AsyncScript = client.register_script(script_source("set_fields"))
        self._void: AsyncScript = client.register_script(script_source("void_attempt"))
        self._lot_take: AsyncScript = client.register_script(script_source("lot_take"))
        self._lease_take = ScriptBatcher(client, script_source("lease_take"), batch_max)
        self._lease_report = ScriptBatcher(client, script_source("lease_report"), batch_max)

    # --- the hot path -----------------------------------------------------

    async def authorize(
        self,
        account_id: str,
        request_id: str,
        amount_micros: int,
        capability: str,
        attempt: str = "",
    ) -> ScriptResult:
        """Raises HotUnavailable when Redis fails or is slower than the call timeout.

        attempt: a token unique to this call, kept in the request record so that a
        void of this call (void_attempt) undoes only what it wrote ('' : none).
        """
        reply = await self._authorize.call(
            self.keys.hot(account_id).for_request(request_id),
            (
                str(amount_micros),
                str(-amount_micros),
                self._request_ttl,
                account_id,
                request_id,
                capability,
                self._trigger_ttl,
                self._backlog_max,
                self._low_balance,
                attempt,
            ),
        ).result()
        low = len(reply) > 3 and reply[3] == 1
        return ScriptResult(reply[0], reply[1], replayed=reply[2] == 1, low_balance=low)

    async def settle(self, account_id: str, request_id: str, amount_micros: int) -> ScriptResult:
        reply = await self._settle.call(
            self.keys.hot(account_id).for_request(request_id),
            (str(amount_micros), account_id, request_id, self._trigger_ttl),
        ).result()
        return ScriptResult(reply[0], reply[1], reply[2], reply[3] == 1)

    # --- balance leases (leases.py, lua/lib/leases.lua) ------------------

    async def lease_take(
        self, holder: str, account_id: str, want_micros: int, min_micros: int, ttl_ms: int
    ) -> LeaseGrant:
        hot = self.keys.hot(account_id)
        reply = await self._lease_take.call(
            (hot.account, hot.leases), (holder, str(want_micros), str(min_micros), str(ttl_ms))
        ).reply
        stop_at, stop_caps = (reply[3], reply[4]) if len(reply) > 4 else (b"", b"")
        return LeaseGrant(
            reply[0], reply[1], reply[2], int(stop_at) if stop_at else None, stop_caps.decode()
        )

    async def lease_report(
        self,
        holder: str,
        account_id: str,
        uses: Sequence[LeasedUse],
        ttl_ms: int,
        *,
        return_all: bool,
    ) -> LeaseReport:
        hot = self.keys.hot(account_id)
        keys = [hot.account, hot.leases, hot.usage_stream, hot.top_up_flag, hot.top_up_stream]
        args = [
            holder,
            str(ttl_ms),
            "1" if return_all else "0",
            account_id,
            self._request_ttl,
            self._trigger_ttl,
        ]
        for use in uses:
            keys.append(hot.request_prefix + use.request_id)
            args += [use.request_id, str(use.amount_micros), use.capability]
        reply = await self._lease_report.call(keys, args).reply
        return LeaseReport(
            reply[0], reply[1], reply[2] == 1, tuple(rid.decode() for rid in reply[3:])
        )

    async def recalled(self, account_ids: Sequence[str]) -> list[bool]:
        """For each account: has another sidecar asked for its leases back?"""
        pipe = self.client.pipeline(transaction=False)
        for account_id in account_ids:
            pipe.hexists(self.keys.account(account_id), "recall")
        return [bool(flag) for flag in await execute_pipeline(self.client, pipe)]

    # --- account state ----------------------------------------------------

    async def void_attempt(self, account_id: str, request_id: str, attempt: str) -> int:
        """Make a timed-out Authorize attempt cost nothing (lua/void_attempt.lua); a VoidResult.

        It undoes the attempt's own debit unless another attempt was answered
        from it, and fences the attempt against a late arrival.
        """
        hot = self.keys.hot(account_id)
        reply = await self._void(
            keys=[hot.account, hot.request_prefix + request_id, hot.usage_stream],
            args=[attempt, self._request_ttl, account_id, request_id],
        )
        return int(reply[0])

    async def request_record(self, account_id: str, request_id: str) -> str | None:
        """A request's record as stored (lua/lib/records.lua); None: unknown."""
        record = await self.client.get(self.keys.request(account_id, request_id))
        return None if record is None else cast(bytes, record).decode()

    async def read_account(self, account_id: str) -> HotAccount | None:
        balance, unflushed, status, leased = await self.client.hmget(
            self.keys.account(account_id), ["balance", "unflushed", "status", "leased"]
        )
        if balance is None:
            return None
        assert isinstance(status, bytes)
        assert unflushed is not None
        held = int(leased or 0)
        return HotAccount(int(balance) + held, int(unflushed), status.decode(), held)

    async def apply_credit(
        self, account_id: str, credit_id: int, amount_micros: int
    ) -> ScriptResult:
        reply = await self._apply_credit(
            keys=[self.keys.account(account_id), self.keys.credit_marker(account_id, credit_id)],
            args=[str(amount_micros), str(CREDIT_MARKER_TTL_SECONDS), str(MAX_SAFE_MICROS)],
        )
        return ScriptResult(int(reply[0]), int(reply[1]))

    async def lot_take(
        self, account_id: str, marker: str, most: int, lot_open: int, open_before: int
    ) -> ScriptResult:
        """Take a lot's money out of the balance once (lua/lot_take.lua); value = micros taken.

        `marker` names this take ("refund:<id>", "expiry:<lot>:<n>"): the same
        marker never takes twice.
        """
        reply = await self._lot_take(
            keys=[self.keys.account(account_id), self.keys.take_marker(account_id, marker)],
            args=[str(most), str(lot_open), str(open_before), str(CREDIT_MARKER_TTL_SECONDS)],
        )
        return ScriptResult(int(reply[0]), 0, int(reply[1]))

    async def sync_account(
        self,
        account_id: str,
        *,
        reconcile: bool,
        ledger_balance_micros: int,
        status: str,
        unapplied_credit_ids: Sequence[int],
        auto_top_up: tuple[bool, int] = (False, 0),
        line_fields: dict[str, str] | None = None,
    ) -> ScriptResult:
        markers = [self.keys.credit_marker(account_id, cid) for cid in unapplied_credit_ids]
        reply = await self._sync(
            keys=[self.keys.account(account_id), *markers],
            args=[
                "reconcile" if reconcile else "load",
                str(ledger_balance_micros),
                status,
                str(CREDIT_MARKER_TTL_SECONDS),
                "1" if auto_top_up[0] else "0",
                str(auto_top_up[1]),
                *(line_fields or credit_line_fields(0, 100, (), 0)).values(),
            ],
        )
        return ScriptResult(int(reply[0]), int(reply[1]), int(reply[2]))

    async def set_credit_line(self, account_id: str, fields: dict[str, str]) -> FieldsWritten:
        """The floor and stop-loss of a credit line (credit_line_fields); a cut recalls
        the account's leases (lua/set_fields.lua)."""
        args = [item for pair in fields.items() for item in pair]
        return FieldsWritten(
            int(await self._set_fields(keys=[self.keys.account(account_id)], args=args))
        )

    async def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy, or None where CONFIG is disabled (managed Redis)."""
        try:
            reply = await self.client.config_get("maxmemory-policy")
        except ResponseError:
            return None
        # redis-py decodes CONFIG GET replies to str.
        return reply.get("maxmemory-policy")

    async def set_status(self, account_id: str, status: str) -> FieldsWritten:
        """Any status but 'active' recalls the account's leases (lua/set_fields.lua)."""
        return FieldsWritten(
            int(
                await self._set_fields(
                    keys=[self.keys.account(account_id)], args=["status", status]
                )
            )
        )

    async def set_auto_top_up(self, account_id: str, on: bool, threshold_micros: int) -> bool:
        """Arm or disarm the trigger in the debit scripts (when the account is loaded)."""
        return bool(
            await self._set_fields(
                keys=[self.keys.account(account_id)],
                args=["at_on", "1" if on else "0", "at_thr", str(threshold_micros)],
            )
        )

    async def mark_top_up_capped(self, account_id: str, seconds: float) -> None:
        """Auto top-up hit its daily or monthly cap: for `seconds` (renewed by each
        capped trigger), allowed answers under the threshold carry low_balance."""
        flag = self.keys.capped_flag(account_id)
        if seconds <= 0:
            await self.client.delete(flag)
        else:
            await self.client.set(flag, "1", px=max(1, int(seconds * 1000)))

    async def hold_top_up_trigger(self, account_id: str, seconds: float) -> None:
        """Keep new triggers off for a while (retry interval, P10); 0 re-arms at once."""
        flag = self.keys.top_up_flag(account_id)
        if seconds <= 0:
            await self.client.delete(flag)
        else:
            await self.client.set(flag, "1", px=max(1, int(seconds * 1000)))

    # --- top-up triggers ----------------------------------------------------

    async def ensure_top_up_groups(self) -> None:
        await self._ensure_groups(self.keys.all_top_up_streams(), TOP_UP_GROUP)

    async def read_top_up_triggers(
        self, consumer: str, count: int, block_ms: int | None, *, stale_ms: int | None = None
    ) -> list[tuple[int, str, str]]:
        """(shard, entry id, account_id) of new triggers, or of ones left pending by
        a dead worker for at least stale_ms."""
        found: list[tuple[int, str, str]] = []
        if stale_ms is not None:
            for shard in range(SHARD_COUNT):
                reply = await self.client.xautoclaim(
                    self.keys.top_up_stream(shard), TOP_UP_GROUP, consumer, stale_ms, "0-0", count
                )
                found += [(shard, i.decode(), f[b"a"].decode()) for i, f in reply[1] if f]
            return found
        new = await self._read_group(
            self.keys.all_top_up_streams(), TOP_UP_GROUP, consumer, count, block_ms
        )
        prefix_len = len(self.keys.prefix) + 2
        for stream, messages in new:
            shard = int(stream[prefix_len : stream.index(b"}")])
            found += [(shard, i.decode(), f[b"a"].decode()) for i, f in messages if f]
        return found

    async def top_up_triggers_waiting(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for stream in self.keys.all_top_up_streams():
            pipe.xlen(stream)
        return sum(await execute_pipeline(self.client, pipe))

    async def ack_top_up_trigger(self, shard: int, entry_id: str) -> None:
        stream = self.keys.top_up_stream(shard)
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(stream, TOP_UP_GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await execute_pipeline(self.client, pipe)

    # --- usage streams ----------------------------------------------------

    async def ensure_usage_groups(self) -> None:
        await self._ensure_groups(self.keys.all_usage_streams(), USAGE_GROUP)

    async def _ensure_groups(self, streams: list[str], group: str) -> None:
        """Create a consumer group on every shard stream (idempotent).

        Id 0: a group created after Redis lost its groups still reads what the
        streams already hold.
        """
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xgroup_create(stream, group, id="0", mkstream=True)
        for result in await execute_pipeline(self.client, pipe, raise_on_error=False):
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise result

    async def read_usage(
        self, consumer: str, count: int, block_ms: int | None, *, own_pending: bool = False
    ) -> list[StreamEntry]:
        """New entries of every shard; waits up to block_ms for some (None: no wait).

        own_pending: instead, the entries this consumer read before and has not
        acknowledged (a flush that failed), without waiting.
        """
        reply = await self._read_group(
            self.keys.all_usage_streams(),
            USAGE_GROUP,
            consumer,
            count,
            None if own_pending else block_ms,
            start="0" if own_pending else ">",
        )
        return self._entries(reply)

    async def _read_group(
        self,
        streams: list[str],
        group: str,
        consumer: str,
        count: int,
        block_ms: int | None,
        start: str = ">",
    ) -> list[list[Any]]:
        """XREADGROUP over every shard's stream: [[stream, [(id, fields)...]]...].

        start '>': new entries; '0': this consumer's pending ones.

        Standalone: one blocking call over all streams. Cluster: the streams
        live in different slots (one XREADGROUP cannot span them), so one
        non-blocking call per stream goes out in a pipeline (redis-py routes
        each to its node), and an empty round waits block_ms here.
        """
        if not is_cluster(self.client):
            by_stream: dict[bytes | str | memoryview, int | bytes | str | memoryview] = {
                stream: start for stream in streams
            }
            reply = await self.client.xreadgroup(group, consumer, by_stream, count, block_ms)
            return cast(list[list[Any]], reply or [])
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xreadgroup(group, consumer, {stream: start}, count)
        found = [
            entry
            for reply in await execute_pipeline(self.client, pipe)
            for entry in cast(list[list[Any]], reply or [])
            if entry[1]  # '0' answers every stream, most with no entries
        ]
        if not found and block_ms:
            await asyncio.sleep(block_ms / 1000)
        return found

    async def claim_stale_usage(
        self, shard: int, consumer: str, min_idle_ms: int, count: int
    ) -> list[StreamEntry]:
        """Take over entries a silent (likely dead) consumer read but never acknowledged."""
        stream = self.keys.usage_stream(shard)
        reply = await self.client.xautoclaim(
            stream, USAGE_GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
        )
        return self._entries([[stream.encode(), reply[1]]])

    async def ack_usage(
        self,
        shard: int,
        entries: Sequence[StreamEntry],
        give_back: Mapping[tuple[int, str], int] | None = None,
    ) -> int:
        """Acknowledge recorded entries; give `give_back[(shard, entry id)]` micros back
        to the entry's hot balance: the debit of a duplicate or a set-aside event, the
        difference of a settle the ledger booked at another amount (issue 13 item 2).

        Keys are (shard, entry id) pairs: an id alone would also name entries of
        other shards written in the same millisecond (issue 13 item 1).
        """
        give_back = give_back or {}
        keys = [self.keys.usage_stream(shard)]
        args: list[str] = [USAGE_GROUP]
        for entry in entries:
            keys.append(self.keys.account(entry.event.account_id))
            refund = give_back.get((shard, entry.entry_id), 0)
            args += [entry.entry_id, str(-entry.event.amount_micros), str(refund)]
        return int(await self._ack.call(keys, args).reply)

    async def usage_backlog(self) -> tuple[int, int | None]:
        """(events not yet flushed, Redis ms timestamp of the oldest), over all shards.

        Flushed events are deleted from their stream, so what a stream holds is
        exactly what Postgres does not have yet.
        """
        backlog = await self.usage_backlog_by_shard()
        return backlog.waiting, backlog.oldest_ms

    async def usage_backlog_by_shard(self) -> UsageBacklog:
        pipe = self.client.pipeline(transaction=False)
        for stream in self.keys.all_usage_streams():
            pipe.xlen(stream)
            pipe.xrange(stream, count=1)
        replies = await execute_pipeline(self.client, pipe)
        lengths: list[int] = replies[0::2]
        oldest = [int(first[0][0].split(b"-")[0]) for first in replies[1::2] if first]
        return UsageBacklog(sum(lengths), max(lengths), min(oldest) if oldest else None)

    def _entries(self, reply: list[list[Any]]) -> list[StreamEntry]:
        prefix_len = len(self.keys.prefix) + 2  # "<prefix>:{"
        entries = []
        for stream, messages in reply:
            assert isinstance(stream, bytes)
            assert isinstance(messages, list)
            shard = int(stream[prefix_len : stream.index(b"}")])
            for entry_id, fields in messages:
                if fields is None:  # deleted while pending; nothing to record
                    continue
                entries.append(
                    StreamEntry(shard, entry_id.decode(), _usage_event(entry_id, fields))
                )
        return entries


def _usage_event(entry_id: bytes, fields: dict[bytes, bytes]) -> UsageEvent:
    millis = int(entry_id.split(b"-")[0])
    occurred_at = dt.datetime.fromtimestamp(millis // 1000, tz=dt.UTC)
    return UsageEvent(
        account_id=fields[b"a"].decode(),
        request_id=fields[b"r"].decode(),
        kind=_KIND[fields[b"k"]],
        amount_micros=int(fields[b"m"]),
        capability=fields[b"c"].decode(),
        occurred_at=occurred_at + dt.timedelta(milliseconds=millis % 1000),
        stream_entry_id=entry_id.decode(),
        final_micros=int(final) if (final := fields.get(b"f")) is not None else None,
    )
