"""Helpers of the issue 13 flusher tests: same-millisecond stream ids, expired records."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from balance_gate.app import App
from balance_gate.keys import shard_of


async def align_usage_streams(
    app: App, redis_client: aioredis.Redis, shards: set[int], millis: int
) -> None:
    """Make every given shard's next usage entries `<millis>-1`, `<millis>-2`, ...

    A stream's last id in the future makes XADD '*' number the next entries
    within that millisecond: entries written in the same order in different
    shards then share ids, as entries of one real millisecond do.
    """
    for shard in shards:
        stream = app.hot.keys.usage_stream(shard)
        await redis_client.execute_command("XSETID", stream, f"{millis}-0")  # type: ignore[no-untyped-call]


def future_millis(offset: int = 0) -> int:
    """A millisecond an hour ahead: later than any id the streams hold yet."""
    return int(time.time() * 1000) + 3_600_000 + offset


async def expire_request_record(
    app: App, redis_client: aioredis.Redis, account_id: str, request_id: str
) -> None:
    """Stand in for the 48 h record lifetime: PEXPIRE 1, then wait until it is gone."""
    key = app.hot.keys.request(account_id, request_id)
    await redis_client.pexpire(key, 1)
    for _ in range(10_000):
        if not await redis_client.exists(key):  # EXISTS expires it once its time is up
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"request record {key} never expired")


def accounts_in_distinct_shards(prefix: str, count: int) -> list[str]:
    """`count` account ids, each in a shard of its own."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        account_id = f"{prefix}-{n}"
        found.setdefault(shard_of(account_id), account_id)
        n += 1
    return list(found.values())
