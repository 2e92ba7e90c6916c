"""Issue 13 item 1: a duplicate gives money back to its own account only (P2).

Stream entry ids are unique per stream only: entries written in the same
millisecond in different shards share an id. The flusher must identify a
duplicate by its shard and id, never by the id alone.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from balance_gate.app import App
from balance_gate.keys import shard_of
from tests.flusher_helpers import (
    accounts_in_distinct_shards,
    align_usage_streams,
    expire_request_record,
    future_millis,
)
from tests.helpers import USD, fund, ledger_balance, rid


async def test_issue13_item1_a_duplicate_in_one_shard_credits_no_account_of_another(
    app: App, redis_client: aioredis.Redis
) -> None:
    """A re-authorizes 20 request ids whose records expired (duplicates) while B,
    in another shard, authorizes 20 new $1 requests whose entries share their ids."""
    a, b = accounts_in_distinct_shards("i13-dup", 2)
    await fund(app, a, 100 * USD)
    await fund(app, b, 100 * USD)
    await align_usage_streams(app, redis_client, {shard_of(a), shard_of(b)}, future_millis())
    repeated = [rid() for _ in range(20)]
    for request_id in repeated:  # entries <ms>-1 .. <ms>-20 in both shards
        assert (await app.gate.authorize(a, request_id, 100_000, "")).allowed
        assert (await app.gate.authorize(b, rid(), USD, "")).allowed
    await app.flusher.drain()
    for request_id in repeated:
        await expire_request_record(app, redis_client, a, request_id)

    for request_id in repeated:  # entries <ms>-21 .. <ms>-40 in both shards
        again = await app.gate.authorize(a, request_id, 100_000, "")
        assert (again.allowed, again.replayed) == (True, False)
        assert (await app.gate.authorize(b, rid(), USD, "")).allowed
    await app.flusher.drain()

    hot_b = await app.hot.read_account(b)
    assert hot_b is not None
    assert (hot_b.balance_micros, hot_b.unflushed_micros) == (60 * USD, 0)
    assert await ledger_balance(app, b) == 60 * USD
    hot_a = await app.hot.read_account(a)
    assert hot_a is not None
    assert hot_a.balance_micros == 98 * USD  # the 20 duplicates given back to A
    assert await ledger_balance(app, a) == 98 * USD
