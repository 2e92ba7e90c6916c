"""Credit lots and their burn-down (issue 5): every credit is a lot; usage burns them."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from balance_gate.app import App
from balance_gate.errors import InvalidArgument
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


async def _expire_now(app: App, account_id: str) -> None:
    await app.pool.execute(
        "UPDATE credit_lots SET expires_at = now() - interval '1 second' WHERE account_id = $1",
        account_id,
    )


async def test_o2_expired_unconsumed_credit_leaves_the_balance_with_a_ledger_entry(
    app: App,
) -> None:
    """O2: of a $5 lot with $2 spent (not yet flushed), $3 expire; the $2 stay paid for."""
    await app.accounts.create("o2", "USD")
    await app.accounts.credit("o2", 5 * USD, "purchase", rid())
    await _spend_unflushed(app, "o2", 2 * USD)
    await _expire_now(app, "o2")
    assert await app.expiry.expire_due() == 3 * USD
    hot = await app.hot.read_account("o2")
    assert hot is not None
    assert hot.balance_micros == 0
    assert not (await app.gate.authorize("o2", rid(), 1, "")).allowed
    entry = await app.pool.fetchrow(
        "SELECT amount_micros, kind FROM credits WHERE account_id = 'o2' AND kind = 'expiry'"
    )
    assert entry is not None
    assert entry["amount_micros"] == -3 * USD
    await app.flusher.drain()
    (lot,) = await _lots(app, "o2")
    assert (lot["consumed_micros"], lot["expired_micros"]) == (2 * USD, 3 * USD)
    assert await app.pg.lot_balance("o2") == await ledger_balance(app, "o2") == 0


async def test_o2_expiry_on_several_sidecars_at_once_takes_once(app: App) -> None:
    await app.accounts.create("o2-twice", "USD")
    for _ in range(3):
        await app.accounts.credit("o2-twice", 1 * USD, "purchase", rid())
    await _expire_now(app, "o2-twice")
    results = await asyncio.gather(*(app.expiry.expire_due() for _ in range(4)))
    assert sum(results) == 3 * USD
    assert await ledger_balance(app, "o2-twice") == 0
    assert await app.expiry.expire_due() == 0  # nothing left to expire


async def test_o2_validity_zero_means_lots_never_expire(app: App) -> None:
    await app.accounts.create("o2-forever", "USD")
    await app.accounts.set_credit_validity("o2-forever", 0)
    await app.accounts.credit("o2-forever", 1 * USD, "purchase", rid())
    (lot,) = await _lots(app, "o2-forever")
    assert lot["never_expires"]
    assert await app.expiry.expire_due() == 0
    with pytest.raises(InvalidArgument, match="days"):
        await app.accounts.set_credit_validity("o2-forever", -1)


async def _spend_unflushed(app: App, account_id: str, micros: int) -> None:
    assert (await app.gate.authorize(account_id, rid(), micros, "")).allowed
