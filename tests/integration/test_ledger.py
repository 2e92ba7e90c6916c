"""Postgres as the system of record: flushing, loading, rebuilding, crash recovery.

The invariant behind every test here: for each account,
    hot balance + unflushed usage == credited - used (the ledger balance),
and once everything is flushed, hot balance == ledger balance.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from balance_gate.app import App
from balance_gate.constants import ScriptCode
from balance_gate.flusher import UsageFlusher
from balance_gate.keys import shard_of
from balance_gate.rebuild import rebuild_all
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import (
    USD,
    authorize_request,
    fund,
    fund_over_grpc,
    ledger_balance,
    rid,
    sidecar_env,
    wait_until_flushed,
)


def _loads(result: str) -> float:
    value = REGISTRY.get_sample_value("balance_gate_account_loads_total", {"result": result})
    return value or 0.0


async def _hot_balance(app: App, account_id: str) -> int:
    hot = await app.hot.read_account(account_id)
    assert hot is not None
    return hot.balance_micros


async def test_usage_rows_sum_to_what_redis_debited_and_flushall_rebuilds(
    running: RunningGate, redis_client: aioredis.Redis
) -> None:
    await fund_over_grpc(running.admin, "load", 5 * USD)
    rng = random.Random(7)
    requests = [authorize_request("load", rng.randrange(0, 40_000)) for _ in range(300)]
    answers = await asyncio.gather(*(running.gate.Authorize(r) for r in requests))
    allowed = [r for r, a in zip(requests, answers, strict=True) if a.allowed]
    settles = [
        gate_pb2.SettleRequest(
            account_id="load", request_id=r.request_id, amount_micros=r.amount_micros // 2
        )
        for r in allowed[:50]
    ]
    await asyncio.gather(*(running.gate.Settle(s) for s in settles))
    debited = sum(r.amount_micros for r in allowed) - sum(
        r.amount_micros - s.amount_micros for r, s in zip(allowed, settles, strict=False)
    )
    balance = await _hot_balance(running.app, "load")
    assert balance == 5 * USD - debited

    await wait_until_flushed(running.app)
    assert await running.app.pg.usage_total("load") == debited
    account = await running.app.pg.get_account("load")
    assert account is not None
    assert account.used_micros == debited
    assert account.ledger_balance_micros == balance

    await redis_client.flushall()
    after = await running.gate.Authorize(authorize_request("load", 0))
    assert (after.allowed, after.balance_micros) == (True, balance)
    # Replays are forgotten with Redis, but the ledger still has each request once.
    await wait_until_flushed(running.app)
    assert await running.app.pg.usage_total("load") == debited


async def test_concurrent_first_requests_load_the_account_exactly_once(
    settings: Settings, app: App, redis_client: aioredis.Redis
) -> None:
    """Two sidecars, 100 concurrent first requests: one load, exact debits."""
    await fund(app, "cold", 500_000)
    await redis_client.flushall()
    await app.hot.ensure_usage_groups()
    other = await App.open(settings, migrate=False)
    try:
        loaded_before = _loads("loaded")
        answers = await asyncio.gather(
            *(
                (app if i % 2 else other).gate.authorize("cold", rid(), 10_000, "")
                for i in range(100)
            )
        )
        assert _loads("loaded") - loaded_before == 1
        assert sum(a.allowed for a in answers) == 50
        assert await _hot_balance(app, "cold") == 0
    finally:
        await other.close()


async def test_credits_racing_with_debits_and_loads_are_never_lost_or_doubled(
    running: RunningGate, redis_client: aioredis.Redis
) -> None:
    await fund_over_grpc(running.admin, "race", 200_000)
    await redis_client.flushall()  # the racing calls also race the first load
    credits = [
        running.admin.Credit(
            admin_pb2.CreditRequest(
                account_id="race", amount_micros=100_000, reason="race", idempotency_key=rid()
            )
        )
        for _ in range(20)
    ]
    debits = [running.gate.Authorize(authorize_request("race", 10_000)) for _ in range(200)]
    results = await asyncio.gather(*credits, *debits)
    allowed = sum(
        1 for r in results[20:] if isinstance(r, gate_pb2.AuthorizeResponse) and r.allowed
    )
    expected = 200_000 + 20 * 100_000 - allowed * 10_000
    assert await _hot_balance(running.app, "race") == expected
    await wait_until_flushed(running.app)
    assert await ledger_balance(running.app, "race") == expected


async def test_rebuild_corrects_drift_and_counts_usage_still_in_the_stream(
    app: App, redis_client: aioredis.Redis
) -> None:
    await fund(app, "drift", 10 * USD)
    for _ in range(10):
        assert (await app.gate.authorize("drift", rid(), 100_000, "")).allowed
    # Nothing is flushed (no background flusher here): 1 USD waits in the stream.
    hot = await app.hot.read_account("drift")
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (9 * USD, USD)
    await redis_client.hincrby(app.hot.keys.account("drift"), "balance", 123)

    report = await rebuild_all(app.pg, app.accounts, app.flusher)
    assert (report.accounts, report.corrected, report.correction_micros) == (1, 1, 123)
    assert await _hot_balance(app, "drift") == 9 * USD

    await app.flusher.drain()
    assert await ledger_balance(app, "drift") == 9 * USD
    assert (await rebuild_all(app.pg, app.accounts, app.flusher)).corrected == 0


async def test_rebuild_records_usage_committed_but_never_acknowledged(app: App) -> None:
    """A flusher crashed after its Postgres commit, before its XACK: the usage is in
    both the ledger and `unflushed`. Rebuild must not count it twice."""
    await fund(app, "crash", USD)
    for _ in range(5):
        assert (await app.gate.authorize("crash", rid(), 100_000, "")).allowed
    entries = await app.hot.read_usage("crashed-consumer", 100, None)
    async with app.pg.shard_lock([shard_of("crash")], exclusive=False) as conn:
        assert (await app.pg.record_usage(conn, [e.event for e in entries])).inserted == 5

    report = await rebuild_all(app.pg, app.accounts, app.flusher)
    assert (report.corrected, report.pending_usage_recorded) == (0, 5)
    hot = await app.hot.read_account("crash")
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (500_000, 0)
    assert await ledger_balance(app, "crash") == 500_000
    assert await app.pg.usage_total("crash") == 500_000


async def test_flusher_takes_over_entries_of_a_crashed_flusher_without_doubling(
    app: App,
) -> None:
    await fund(app, "takeover", USD)
    for _ in range(4):
        assert (await app.gate.authorize("takeover", rid(), 50_000, "")).allowed
    entries = await app.hot.read_usage("crashed-consumer", 100, None)
    async with app.pg.shard_lock([shard_of("takeover")], exclusive=False) as conn:
        await app.pg.record_usage(conn, [e.event for e in entries[:2]])  # crashed midway

    survivor = UsageFlusher(
        app.hot, app.pg, batch_size=100, block_ms=1, claim_idle_ms=0, stats_interval_ms=1
    )
    assert await survivor.claim_stale() == 4
    assert await app.pg.usage_total("takeover") == 200_000
    assert await ledger_balance(app, "takeover") == 800_000
    hot = await app.hot.read_account("takeover")
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (800_000, 0)
    assert await survivor.claim_stale() == 0


async def test_sweeper_applies_a_credit_a_crash_left_out_of_redis_once(app: App) -> None:
    await fund(app, "sweep", USD)
    async with app.pg.shard_lock([shard_of("sweep")], exclusive=False) as conn:
        await app.pg.record_credit(conn, "sweep", 300_000, "crash", rid(), 2**53 - 1)
    assert await _hot_balance(app, "sweep") == USD

    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 1
    assert await _hot_balance(app, "sweep") == 1_300_000
    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 0
    assert await _hot_balance(app, "sweep") == 1_300_000


async def test_sweeper_never_reapplies_a_credit_redis_already_has(app: App) -> None:
    """Crash after the Redis apply, before Postgres marked it: the marker wins."""
    await fund(app, "marked", USD)
    async with app.pg.shard_lock([shard_of("marked")], exclusive=False) as conn:
        credit = await app.pg.record_credit(conn, "marked", 300_000, "crash", rid(), 2**53 - 1)
    first = await app.hot.apply_credit("marked", credit.credit_id, credit.amount_micros)
    assert first.code == ScriptCode.OK

    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 1
    assert await _hot_balance(app, "marked") == 1_300_000


async def test_load_counts_a_credit_not_yet_applied_and_it_is_never_applied_again(
    app: App,
) -> None:
    await app.pg.create_account("late", "USD")  # in Postgres only: not loaded
    async with app.pg.shard_lock([shard_of("late")], exclusive=False) as conn:
        await app.pg.record_credit(conn, "late", 700_000, "crash", rid(), 2**53 - 1)
    assert await app.hot.read_account("late") is None

    decision = await app.gate.authorize("late", rid(), 100_000, "")
    assert (decision.allowed, decision.balance_micros) == (True, 600_000)
    await app.accounts.sweep_unapplied_credits(older_than_s=0)
    assert await _hot_balance(app, "late") == 600_000


async def test_rebuild_command_line(settings: Settings, app: App) -> None:
    await fund(app, "cli", USD)
    await app.gate.authorize("cli", rid(), 250_000, "")
    env = sidecar_env(settings)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "balance_gate", "rebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "rebuilt 1 accounts: 0 corrected" in done.stdout
    assert await _hot_balance(app, "cli") == 750_000


async def test_p2_retry_after_redis_lost_its_records_is_given_back_by_the_flusher(
    app: App, redis_client: aioredis.Redis
) -> None:
    """P2 across a Redis data loss: Redis forgets request ids, Postgres does not.
    The repeated debit is reverted when the flusher finds the request recorded."""
    await fund(app, "amnesia", USD)
    request_id = rid()
    assert (await app.gate.authorize("amnesia", request_id, 300_000, "")).allowed
    await app.flusher.drain()
    await redis_client.flushall()
    await app.hot.ensure_usage_groups()

    again = await app.gate.authorize("amnesia", request_id, 300_000, "")
    assert (again.allowed, again.replayed, again.balance_micros) == (True, False, 400_000)
    await app.flusher.drain()
    hot = await app.hot.read_account("amnesia")
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (700_000, 0)
    assert await ledger_balance(app, "amnesia") == 700_000
    assert await app.pg.usage_total("amnesia") == 300_000


async def test_a_credit_that_cannot_be_applied_never_blocks_the_sweeper(
    app: App, redis_client: aioredis.Redis
) -> None:
    await fund(app, "drifted", USD)
    await fund(app, "healthy", USD)
    # The hot balance drifted to the edge of what a Lua double holds exactly.
    await redis_client.hset(app.hot.keys.account("drifted"), "balance", str(2**53 - 10))
    for account_id in ("drifted", "healthy"):  # the stuck credit is the older one
        async with app.pg.shard_lock([shard_of(account_id)], exclusive=False) as conn:
            await app.pg.record_credit(conn, account_id, 100, "crash", rid(), 2**53 - 1)

    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 1
    assert await _hot_balance(app, "healthy") == USD + 100
    assert await _hot_balance(app, "drifted") == 2**53 - 10
    # A rebuild reconciles the drift and counts the stuck credit exactly once.
    await rebuild_all(app.pg, app.accounts, app.flusher)
    assert await _hot_balance(app, "drifted") == USD + 100
    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 1
    assert await _hot_balance(app, "drifted") == USD + 100
