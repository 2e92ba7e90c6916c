"""Issue 13 item 2: a late settle of a duplicate must not create money (P2).

The issue's sequence: authorize `r1` at $0.10, its record expires, `r1` is
authorized again at $5 (allowed, not replayed: a duplicate the flusher gives
back), then `Settle r1 0`. The ledger held `authorize 100000` and
`settle -5000000`: used fell by $5 and the balance rose by $5, on an account
with enough past usage for the lots to pay it back, and the audit saw nothing
(hot state and ledger agreed).

The rule now (docs/reliability.md, "Settles follow the ledger"): the ledger
keeps the first authorization and the first settle of a request id, and a
settle (or a void) sets that request's final cost against the authorization the
ledger holds; Redis gets the difference back when the entry is acknowledged.
The audit reports a request whose usage rows sum below zero, and an account
whose used total is not the sum of its rows (exit 1).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import redis.asyncio as aioredis

from balance_gate.app import App
from balance_gate.audit import audit_all, format_report
from balance_gate.keys import shard_of
from balance_gate.settings import Settings
from tests.flusher_helpers import expire_request_record
from tests.helpers import USD, fund, ledger_balance, rid, sidecar_env

ACCOUNT = "i13-late-settle"
START = 100 * USD
PAST_USAGE = 20 * USD  # enough for the lots to pay back the $5 of the issue


async def _account_with_past_usage(app: App) -> None:
    await fund(app, ACCOUNT, START)
    for _ in range(4):
        assert (await app.gate.authorize(ACCOUNT, rid(), PAST_USAGE // 4, "")).allowed
    await app.flusher.drain()


async def _reuse_expired_request(app: App, redis_client: aioredis.Redis, second: int) -> None:
    """r1 at $0.10 (flushed), its record expires, r1 again at `second`: allowed afresh."""
    assert (await app.gate.authorize(ACCOUNT, "r1", 100_000, "")).allowed
    await app.flusher.drain()
    await expire_request_record(app, redis_client, ACCOUNT, "r1")
    again = await app.gate.authorize(ACCOUNT, "r1", second, "")
    assert (again.allowed, again.replayed) == (True, False)


async def _usage_rows(app: App, request_id: str) -> list[tuple[str, int]]:
    rows = await app.pool.fetch(
        "SELECT kind, amount_micros FROM usage_events WHERE account_id = $1 AND request_id = $2"
        " ORDER BY kind",
        ACCOUNT,
        request_id,
    )
    return [(r["kind"], r["amount_micros"]) for r in rows]


async def _assert_hot_follows_ledger(app: App, balance: int) -> None:
    await app.flusher.drain()
    hot = await app.hot.read_account(ACCOUNT)
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (balance, 0)
    assert await ledger_balance(app, ACCOUNT) == balance
    row = await app.pg.get_account(ACCOUNT)
    assert row is not None
    assert row.used_micros == await app.pg.usage_total(ACCOUNT)
    report = await audit_all(app.pg, app.hot, app.flusher)
    assert report.clean, "\n".join(format_report(report))


async def test_issue13_item2_a_late_settle_of_a_duplicate_creates_no_money(
    app: App, redis_client: aioredis.Redis
) -> None:
    """`Settle r1 0` after the $5 duplicate: r1's final cost is 0 against the $0.10 the
    ledger authorized. Before the fix the ledger credited $5 (balance $84.90)."""
    await _account_with_past_usage(app)
    await _reuse_expired_request(app, redis_client, 5 * USD)
    settled = await app.gate.settle(ACCOUNT, "r1", 0)
    assert settled.delta_micros == -5 * USD  # what Redis knows: its own $5 decision

    await app.flusher.drain()

    await _assert_hot_follows_ledger(app, START - PAST_USAGE)
    assert await _usage_rows(app, "r1") == [("authorize", 100_000), ("settle", -100_000)]
    assert await app.pool.fetchval("SELECT count(*) FROM usage_dead_letters") == 0


async def test_issue13_item2_a_settle_up_of_a_duplicate_charges_its_final_cost(
    app: App, redis_client: aioredis.Redis
) -> None:
    """`Settle r1 7` after the $5 duplicate: r1 costs $7 in the ledger (its final cost
    against the $0.10 authorization), not $0.10 + ($7 - $5)."""
    await _account_with_past_usage(app)
    await _reuse_expired_request(app, redis_client, 5 * USD)
    await app.gate.settle(ACCOUNT, "r1", 7 * USD)

    await app.flusher.drain()

    assert await _usage_rows(app, "r1") == [("authorize", 100_000), ("settle", 6_900_000)]
    await _assert_hot_follows_ledger(app, START - PAST_USAGE - 7 * USD)


async def test_issue13_item2_a_void_of_a_duplicate_gives_back_no_more_than_the_ledger_holds(
    app: App, redis_client: aioredis.Redis
) -> None:
    """A void (fail_closed, outage.py) of the $5 duplicate is a settle to 0: it gives
    back r1's $0.10, never the $5 the ledger did not hold."""
    await _account_with_past_usage(app)
    assert (await app.gate.authorize(ACCOUNT, "r1", 100_000, "")).allowed
    await app.flusher.drain()
    await expire_request_record(app, redis_client, ACCOUNT, "r1")
    assert (await app.hot.authorize(ACCOUNT, "r1", 5 * USD, "", attempt="a1")).code == 0
    assert await app.hot.void_attempt(ACCOUNT, "r1", "a1") == 4  # UNDONE

    await app.flusher.drain()

    assert await _usage_rows(app, "r1") == [("authorize", 100_000), ("settle", -100_000)]
    await _assert_hot_follows_ledger(app, START - PAST_USAGE)


async def test_issue13_item2_a_settle_recorded_before_its_authorize_stays_exact(
    app: App,
) -> None:
    """A flusher that read an authorize and died leaves it pending while another
    records the settle: the ledger has no authorization yet, so the settle books the
    final cost and the authorize, taken over later, is booked at 0. Before the fix,
    on an account with no past usage, the settle's -$2 was refused (burn_down) and set
    aside, and the customer paid $3 for a request settled at $1."""
    await fund(app, ACCOUNT, START)
    assert (await app.gate.authorize(ACCOUNT, "r1", 3 * USD, "")).allowed
    assert len(await app.hot.read_usage("crashed-consumer", 100, None)) == 1
    await app.gate.settle(ACCOUNT, "r1", USD)
    assert await app.flusher.drain() == 1  # the settle alone
    assert await _usage_rows(app, "r1") == [("settle", USD)]

    # The authorize, taken over from the dead consumer (as a rebuild or claim_stale does).
    async with app.pg.shard_lock([shard_of(ACCOUNT)], exclusive=True) as conn:
        assert await app.flusher.record_pending_locked(conn, shard_of(ACCOUNT)) == 1

    assert await _usage_rows(app, "r1") == [("authorize", 0), ("settle", USD)]
    await _assert_hot_follows_ledger(app, START - USD)
    assert await app.pool.fetchval("SELECT count(*) FROM usage_dead_letters") == 0


async def _run_audit(settings: Settings) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "balance_gate", "audit"],
        env=sidecar_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _book_by_hand(app: App, request_id: str, rows: list[tuple[str, int]]) -> None:
    """Write usage rows straight into the ledger and move the hot balance with them, as
    the issue's flusher did: hot state and ledger agree, only the rows are wrong."""
    for kind, amount in rows:
        await app.pool.execute(
            "INSERT INTO usage_events (account_id, request_id, kind, amount_micros,"
            " occurred_at, stream_entry_id) VALUES ($1, $2, $3, $4, now(), $5)",
            ACCOUNT,
            request_id,
            kind,
            amount,
            f"hand-{kind}",
        )
    total = sum(amount for _, amount in rows)
    await app.pool.execute(
        "UPDATE accounts SET used_micros = used_micros + $2 WHERE account_id = $1", ACCOUNT, total
    )
    await app.hot.client.hincrby(app.hot.keys.account(ACCOUNT), "balance", -total)


async def test_issue13_item2_the_audit_reports_a_request_that_gave_back_more_than_it_cost(
    settings: Settings, app: App
) -> None:
    """The ledger state the issue left behind, crafted by hand: `authorize 100000`,
    `settle -5000000`. Hot and ledger agree; the audit must still exit 1."""
    await _account_with_past_usage(app)
    await _book_by_hand(app, "r1", [("authorize", 100_000), ("settle", -5 * USD)])
    assert await ledger_balance(app, ACCOUNT) == START - PAST_USAGE + 4_900_000

    done = await _run_audit(settings)

    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{ACCOUNT}: request 'r1' costs -4900000 micros" in done.stdout


async def test_issue13_item2_the_audit_reports_used_that_is_not_the_sum_of_its_rows(
    settings: Settings, app: App
) -> None:
    """used_micros lowered by $1 with no usage row (and the hot balance with it)."""
    await _account_with_past_usage(app)
    await app.pool.execute(
        "UPDATE accounts SET used_micros = used_micros - $2 WHERE account_id = $1", ACCOUNT, USD
    )
    await app.hot.client.hincrby(app.hot.keys.account(ACCOUNT), "balance", USD)

    done = await _run_audit(settings)

    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{ACCOUNT}: used {PAST_USAGE - USD} micros but its usage rows sum to {PAST_USAGE}" in (
        done.stdout
    )
