"""Credit lots and their burn-down (issue 5): every credit is a lot; usage burns them."""

from __future__ import annotations

import asyncpg

from balance_gate.app import App
from tests.helpers import USD, ledger_balance, rid


async def _lots(app: App, account_id: str) -> list[asyncpg.Record]:
    return await app.pool.fetch(
        """SELECT source, amount_micros, consumed_micros, refunded_micros, expired_micros,
                  expires_at IS NULL AS never_expires
           FROM credit_lots WHERE account_id = $1 ORDER BY lot_id""",
        account_id,
    )


async def _validity(app: App, account_id: str, days: int) -> None:
    await app.pool.execute(
        "UPDATE accounts SET credit_validity_days = $2 WHERE account_id = $1", account_id, days
    )


async def _spend(app: App, account_id: str, micros: int) -> None:
    decision = await app.gate.authorize(account_id, rid(), micros, "")
    assert decision.allowed
    await app.flusher.drain()


async def test_usage_burns_the_soonest_expiring_lot_first_then_the_oldest(app: App) -> None:
    await app.accounts.create("burner", "USD")
    await app.accounts.credit("burner", 2 * USD, "first, a year", rid())  # expires in 365 days
    await _validity(app, "burner", 0)
    await app.accounts.credit("burner", 2 * USD, "never expires", rid())
    await _validity(app, "burner", 30)
    await app.accounts.credit("burner", 1 * USD, "30 days", rid())
    await _spend(app, "burner", 1_500_000)
    lots = await _lots(app, "burner")
    # The 30-day lot went first, then the one-year lot; the lot that never expires is last.
    assert [lot["consumed_micros"] for lot in lots] == [500_000, 0, 1 * USD]
    assert lots[1]["never_expires"]
    await _spend(app, "burner", 2 * USD)
    assert [lot["consumed_micros"] for lot in await _lots(app, "burner")] == [
        2 * USD,
        500_000,
        1 * USD,
    ]
    assert await app.pg.lot_balance("burner") == await ledger_balance(app, "burner")


async def test_o3_a_top_up_first_pays_off_the_negative_balance(app: App) -> None:
    """O3: usage beyond every lot is unpaid; the next credit pays it off first."""
    await app.accounts.create("owing", "USD")
    await app.accounts.credit("owing", 1 * USD, "start", rid())
    assert (await app.gate.authorize("owing", "r1", 1 * USD, "")).allowed
    settled = await app.gate.settle("owing", "r1", 3 * USD)  # delayed billing: $2 more
    assert settled.balance_micros == -2 * USD
    await app.flusher.drain()
    assert await app.pool.fetchval(
        "SELECT unpaid_micros FROM accounts WHERE account_id = 'owing'"
    ) == (2 * USD)
    await app.accounts.credit("owing", 5 * USD, "top-up", rid())
    lots = await _lots(app, "owing")
    assert [lot["consumed_micros"] for lot in lots] == [1 * USD, 2 * USD]
    assert (
        await app.pool.fetchval("SELECT unpaid_micros FROM accounts WHERE account_id = 'owing'")
        == 0
    )
    assert await app.pg.lot_balance("owing") == 3 * USD == await ledger_balance(app, "owing")


async def test_settle_credit_back_and_operator_debit_keep_lots_exact(app: App) -> None:
    await app.accounts.create("mover", "USD")
    await app.accounts.credit("mover", 3 * USD, "start", rid())
    assert (await app.gate.authorize("mover", "r1", 2 * USD, "")).allowed
    await app.flusher.drain()
    await app.gate.settle("mover", "r1", 500_000)  # $1.50 back
    await app.flusher.drain()
    assert [lot["consumed_micros"] for lot in await _lots(app, "mover")] == [500_000]
    await app.accounts.credit("mover", -1 * USD, "operator debit", rid())
    assert [lot["consumed_micros"] for lot in await _lots(app, "mover")] == [1_500_000]
    assert await app.pg.lot_balance("mover") == 1_500_000 == await ledger_balance(app, "mover")
