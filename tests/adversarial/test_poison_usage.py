"""Issue 13 item 3: one usage event the ledger refuses must not stop the ledger.

The poison event of the issue was `Settle r1 0` after r1 ($0.10, flushed) was
decided again at $5 once its record expired: -$5 that no lot consumed, so
`burn_down` raised. Since item 2 that settle is priced against the ledger's
$0.10 and is no poison (tests/adversarial/test_late_settle_of_duplicate.py).
The same refusal still meets a settle written by an earlier version (a
difference, no final cost) for a request the ledger does not hold: it is
written here by hand, with the effect settle.lua had on the hot balance. The
event is set aside in usage_dead_letters with the reason, counted, and undone
in Redis; every other event reaches Postgres; the gauges keep refreshing;
`audit` and `rebuild` report instead of crashing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from balance_gate import metrics
from balance_gate.app import App
from balance_gate.flusher import UsageFlusher
from balance_gate.postgres_store import Connection, PostgresStore, UsageEvent, UsageRecorded
from balance_gate.settings import Settings
from tests.conftest import RunningGate
from tests.helpers import USD, fund, ledger_balance, rid, sidecar_env, wait_until_flushed

POISON = "i13-poison"
HEALTHY = "i13-healthy"


def _dead_letters_counted() -> float:
    return REGISTRY.get_sample_value("balance_gate_usage_dead_letters_total") or 0.0


# A settle as versions before issue 13 item 2 wrote it: the difference only, no 'f'.
_EARLIER_VERSIONS_SETTLE = """
redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', -tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'unflushed', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'k', 's', 'a', ARGV[1], 'r', ARGV[2], 'm', ARGV[3], 'c', '')
"""


async def _write_poison_and_healthy_usage(app: App, redis_client: aioredis.Redis) -> None:
    """On POISON: r1 at $0.10 (flushed), then a settle of -$5 for r2, which the ledger
    never authorized, written as earlier versions did. 5 x $0.10 on HEALTHY."""
    await fund(app, POISON, 10 * USD)
    await fund(app, HEALTHY, 10 * USD)
    assert (await app.gate.authorize(POISON, "r1", 100_000, "")).allowed
    await app.flusher.drain()
    hot = app.hot.keys.hot(POISON)
    await redis_client.eval(
        _EARLIER_VERSIONS_SETTLE, 2, hot.account, hot.usage_stream, POISON, "r2", str(-5 * USD)
    )
    for _ in range(5):
        assert (await app.gate.authorize(HEALTHY, rid(), 100_000, "")).allowed


async def _assert_ledger_flowed_and_poison_set_aside(app: App) -> None:
    waiting, _ = await app.hot.usage_backlog()
    assert waiting == 0
    assert await ledger_balance(app, HEALTHY) == 9_500_000
    # The ledger holds r1's authorize only; the settle is set aside and undone in
    # Redis, so the hot balance follows the ledger.
    assert await ledger_balance(app, POISON) == 9_900_000
    hot = await app.hot.read_account(POISON)
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (9_900_000, 0)
    rows = await app.pool.fetch(
        "SELECT account_id, request_id, kind, amount_micros, sqlstate, reason"
        " FROM usage_dead_letters"
    )
    assert [(r["account_id"], r["request_id"], r["kind"], r["amount_micros"]) for r in rows] == [
        (POISON, "r2", "settle", -5 * USD)
    ]
    assert rows[0]["sqlstate"] == "P0001"
    assert "no lot consumed" in rows[0]["reason"]


async def test_issue13_item3_a_poison_event_is_set_aside_and_every_other_event_flows(
    app: App, redis_client: aioredis.Redis
) -> None:
    await _write_poison_and_healthy_usage(app, redis_client)
    counted_before = _dead_letters_counted()

    await app.flusher.drain()

    await _assert_ledger_flowed_and_poison_set_aside(app)
    assert _dead_letters_counted() - counted_before == 1
    # A second pass finds nothing left to set aside.
    assert await app.flusher.drain() == 0
    assert _dead_letters_counted() - counted_before == 1


async def test_issue13_item3_the_background_flusher_keeps_flowing_past_a_poison_event(
    running: RunningGate, redis_client: aioredis.Redis
) -> None:
    app = running.app
    await _write_poison_and_healthy_usage(app, redis_client)
    await wait_until_flushed(app, timeout_s=60)
    await _assert_ledger_flowed_and_poison_set_aside(app)
    # Usage written afterwards flows too.
    assert (await app.gate.authorize(HEALTHY, rid(), 100_000, "")).allowed
    await wait_until_flushed(app, timeout_s=60)
    assert await ledger_balance(app, HEALTHY) == 9_400_000


class _PostgresDown(UsageFlusher):
    async def flush_once(self, block_ms: int | None) -> int:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("postgres went away")


async def test_issue13_item3_backlog_and_lag_gauges_refresh_while_every_flush_fails(
    app: App,
) -> None:
    await fund(app, HEALTHY, USD)
    for _ in range(3):
        assert (await app.gate.authorize(HEALTHY, rid(), 1_000, "")).allowed
    flusher = _PostgresDown(
        app.hot, app.pg, batch_size=100, block_ms=1, claim_idle_ms=60_000, stats_interval_ms=1
    )
    metrics.USAGE_BACKLOG.set(-1)  # a value no refresh would set
    stop = asyncio.Event()
    task = asyncio.create_task(flusher.run(stop))
    try:
        for _ in range(3_000):  # bounded: 60 s at most, on a loaded machine
            if REGISTRY.get_sample_value("balance_gate_usage_backlog_events") == 3:
                break
            await asyncio.sleep(0.02)
        assert REGISTRY.get_sample_value("balance_gate_usage_backlog_events") == 3
    finally:
        stop.set()
        await task


async def _run_command(settings: Settings, command: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "balance_gate", command],
        env=sidecar_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_issue13_item3_audit_sets_a_pending_poison_event_aside_instead_of_crashing(
    settings: Settings, app: App, redis_client: aioredis.Redis
) -> None:
    await _write_poison_and_healthy_usage(app, redis_client)
    # A flusher read them and died: they are pending, which the audit records first.
    assert len(await app.hot.read_usage("crashed-consumer", 100, None)) == 6

    done = await _run_command(settings, "audit")

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 usage events set aside" in done.stdout
    await _assert_ledger_flowed_and_poison_set_aside(app)


async def test_issue13_item3_rebuild_sets_a_pending_poison_event_aside_instead_of_crashing(
    settings: Settings, app: App, redis_client: aioredis.Redis
) -> None:
    await _write_poison_and_healthy_usage(app, redis_client)
    assert len(await app.hot.read_usage("crashed-consumer", 100, None)) == 6

    done = await _run_command(settings, "rebuild")

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 corrected" in done.stdout
    await _assert_ledger_flowed_and_poison_set_aside(app)


@pytest.mark.parametrize("command", ["audit", "rebuild"])
async def test_issue13_item3_a_failing_audit_or_rebuild_is_one_error_line_and_exit_2(
    settings: Settings, app: App, redis_client: aioredis.Redis, command: str
) -> None:
    """Whatever stops them (here: the dead-letter table is missing), the operator
    gets what failed and a non-zero status, not a traceback."""
    await _write_poison_and_healthy_usage(app, redis_client)
    assert len(await app.hot.read_usage("crashed-consumer", 100, None)) == 6
    await app.pool.execute("ALTER TABLE usage_dead_letters RENAME TO moved_away")

    done = await _run_command(settings, command)

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2
    assert f"{command} failed: " in done.stderr


class _DeadlockOnce(PostgresStore):
    """The first batch meets a deadlock: a moment's failure, not the events' fault."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.failed = False

    async def record_usage(self, conn: Connection, events: Sequence[UsageEvent]) -> UsageRecorded:
        if not self.failed:
            self.failed = True
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return await super().record_usage(conn, events)


async def test_issue13_item3_a_transient_postgres_failure_sets_nothing_aside(app: App) -> None:
    """Only a refusal for the data (SQLSTATE 22, 23, P0) makes a poison event: a
    deadlock leaves the batch pending, and the next flush records all of it."""
    await fund(app, HEALTHY, USD)
    for _ in range(3):
        assert (await app.gate.authorize(HEALTHY, rid(), 100_000, "")).allowed
    flusher = UsageFlusher(
        app.hot,
        _DeadlockOnce(app.pool),
        batch_size=100,
        block_ms=1,
        claim_idle_ms=60_000,
        stats_interval_ms=1,
    )
    with pytest.raises(asyncpg.exceptions.DeadlockDetectedError):
        await flusher.flush_once(None)
    assert await flusher.drain() == 3
    assert flusher.set_aside_count == 0
    assert await app.pool.fetchval("SELECT count(*) FROM usage_dead_letters") == 0
    assert await ledger_balance(app, HEALTHY) == 700_000
