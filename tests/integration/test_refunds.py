"""P13: only the unconsumed part of a top-up is refunded, once, even under traffic."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from balance_gate.app import App
from balance_gate.errors import FailedPrecondition
from balance_gate.refunds import RefundRow
from balance_gate.top_up_store import TopUpRow
from balance_gate.v1 import admin_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, ledger_balance, rid

CENT = 10_000


async def _topped_up(app: App, account_id: str, micros: int) -> TopUpRow:
    await app.accounts.create(account_id, "USD")
    await app.topups.set_payment_methods(account_id, "pm_card_visa", "")
    top_up = await app.topups.manual(account_id, micros, rid())
    assert top_up.status == "succeeded"
    return top_up


async def _card_refunds(app: App) -> list[int]:
    rows = await app.pool.fetch("SELECT amount_minor FROM sandbox_refunds ORDER BY created_at")
    return [row["amount_minor"] for row in rows]


async def _lot(app: App, top_up: TopUpRow) -> tuple[int, int, int]:
    row = await app.pool.fetchrow(
        """SELECT l.amount_micros, l.consumed_micros, l.refunded_micros
           FROM credit_lots l JOIN top_ups t ON t.credit_id = l.credit_id
           WHERE t.top_up_id = $1""",
        top_up.top_up_id,
    )
    assert row is not None
    return row["amount_micros"], row["consumed_micros"], row["refunded_micros"]


async def _spend(app: App, account_id: str, micros: int, count: int = 1) -> None:
    for _ in range(count):
        assert (await app.gate.authorize(account_id, rid(), micros, "")).allowed


async def test_p13_refund_all_leaves_what_traffic_consumed(app: App) -> None:
    """Usage not yet flushed counts as consumed: $5 top-up, $2 spent, $3 refunded."""
    top_up = await _topped_up(app, "p13-all", 5 * USD)
    await _spend(app, "p13-all", 2 * USD)  # still in Redis only
    refund = await app.refunds.refund_top_up(top_up.top_up_id, 0, "customer left", rid())
    assert refund.status == "succeeded"
    assert refund.refunded_micros == 3 * USD
    assert not refund.partial
    assert await _card_refunds(app) == [300]  # cents, in the charged currency
    note = await app.pool.fetchrow(
        "SELECT amount_minor, currency, line FROM credit_notes WHERE refund_id = $1",
        refund.refund_id,
    )
    assert note is not None
    assert (note["amount_minor"], note["currency"]) == (-300, "USD")
    assert refund.credit_note_number is not None
    hot = await app.hot.read_account("p13-all")
    assert hot is not None
    assert hot.balance_micros == 0
    await app.flusher.drain()
    assert await _lot(app, top_up) == (5 * USD, 2 * USD, 3 * USD)
    assert await app.pg.lot_balance("p13-all") == await ledger_balance(app, "p13-all") == 0


async def test_p13_asking_for_more_than_is_unconsumed_refunds_what_is_left(app: App) -> None:
    top_up = await _topped_up(app, "p13-part", 5 * USD)
    await _spend(app, "p13-part", 4 * USD)
    refund = await app.refunds.refund_top_up(top_up.top_up_id, 2 * USD, "too much", rid())
    assert refund.refunded_micros == 1 * USD
    assert refund.partial
    assert await _card_refunds(app) == [100]


async def test_p13_refund_is_idempotent(app: App) -> None:
    top_up = await _topped_up(app, "p13-again", 5 * USD)
    key = rid()
    first = await app.refunds.refund_top_up(top_up.top_up_id, 1 * USD, "once", key)
    again = await app.refunds.refund_top_up(top_up.top_up_id, 1 * USD, "once", key)
    assert again == first
    assert await _card_refunds(app) == [100]
    assert await ledger_balance(app, "p13-again") == 4 * USD
    with pytest.raises(FailedPrecondition):
        await app.refunds.refund_top_up(top_up.top_up_id, 2 * USD, "once", key)


async def test_p13_refund_racing_500_requests_accounts_for_every_cent(app: App) -> None:
    """500 $0.01 requests on a $5 top-up, 16 at a time; a full refund starts mid-traffic."""
    top_up = await _topped_up(app, "p13-race", 5 * USD)
    room = asyncio.Semaphore(16)
    answered = 0
    traffic_flows = asyncio.Event()

    async def one() -> bool:
        nonlocal answered
        async with room:
            allowed = (await app.gate.authorize("p13-race", rid(), CENT, "")).allowed
        answered += 1
        if answered == 50:
            traffic_flows.set()
        return allowed

    async def refund_mid_traffic() -> RefundRow:
        await traffic_flows.wait()
        return await app.refunds.refund_top_up(top_up.top_up_id, 0, "race", rid())

    traffic = asyncio.gather(*(one() for _ in range(500)))
    refund, answers = await asyncio.gather(refund_mid_traffic(), traffic)
    allowed = sum(answers)
    assert allowed >= 50
    await app.flusher.drain()
    amount, consumed, refunded = await _lot(app, top_up)
    assert consumed == allowed * CENT
    assert refunded == refund.refunded_micros
    # Exactly: every cent was either consumed or refunded, none both, none lost.
    assert consumed + refunded == amount == 5 * USD
    assert await ledger_balance(app, "p13-race") == 0
    expected_card = [refund.refunded_micros // CENT] if refund.refunded_micros else []
    assert await _card_refunds(app) == expected_card


async def test_p13_concurrent_refunds_never_exceed_the_unconsumed_part(app: App) -> None:
    top_up = await _topped_up(app, "p13-many", 5 * USD)
    refunds = await asyncio.gather(
        *(app.refunds.refund_top_up(top_up.top_up_id, 2 * USD, "split", rid()) for _ in range(5))
    )
    assert sorted(r.refunded_micros for r in refunds) == [0, 0, 1 * USD, 2 * USD, 2 * USD]
    assert sum(await _card_refunds(app)) == 500
    assert await ledger_balance(app, "p13-many") == 0


async def test_p13_usage_burns_earlier_lots_before_the_refunded_one(app: App) -> None:
    """A $3 credit from before burns first: of $4 spent, $1 comes from the top-up."""
    await app.accounts.create("p13-order", "USD")
    await app.accounts.credit("p13-order", 3 * USD, "welcome credit", rid())
    await app.topups.set_payment_methods("p13-order", "pm_card_visa", "")
    top_up = await app.topups.manual("p13-order", 5 * USD, rid())
    await _spend(app, "p13-order", 4 * USD)
    refund = await app.refunds.refund_top_up(top_up.top_up_id, 0, "order", rid())
    assert refund.refunded_micros == 4 * USD
    await app.flusher.drain()
    assert await _lot(app, top_up) == (5 * USD, 1 * USD, 4 * USD)
    assert await app.pg.lot_balance("p13-order") == await ledger_balance(app, "p13-order")


async def test_o2_expired_credit_is_not_refundable(app: App) -> None:
    top_up = await _topped_up(app, "p13-old", 5 * USD)
    await app.pool.execute(
        """UPDATE credit_lots SET expires_at = now() - interval '1 day'
           WHERE credit_id = (SELECT credit_id FROM top_ups WHERE top_up_id = $1)""",
        top_up.top_up_id,
    )
    refund = await app.refunds.refund_top_up(top_up.top_up_id, 0, "too late", rid())
    assert refund.refunded_micros == 0
    assert await _card_refunds(app) == []


async def test_refund_over_grpc(running: RunningGate) -> None:
    admin = running.admin
    await admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="p13-rpc"))
    await admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id="p13-rpc", primary="pm_card_visa")
    )
    top_up = await admin.TopUp(
        admin_pb2.TopUpRequest(account_id="p13-rpc", amount_micros=5 * USD, idempotency_key="t1")
    )
    refund = await admin.RefundTopUp(
        admin_pb2.RefundTopUpRequest(top_up_id=top_up.top_up_id, reason="rpc", idempotency_key="r1")
    )
    assert (refund.refunded_micros, refund.status, refund.refund_minor) == (
        5 * USD,
        "succeeded",
        500,
    )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await admin.RefundTopUp(
            admin_pb2.RefundTopUpRequest(top_up_id=999_999, reason="x", idempotency_key="r2")
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as negative:
        await admin.RefundTopUp(
            admin_pb2.RefundTopUpRequest(
                top_up_id=top_up.top_up_id, amount_micros=-1, reason="x", idempotency_key="r3"
            )
        )
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount_micros" in (negative.value.details() or "")
