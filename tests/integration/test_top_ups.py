"""Manual top-ups through the sandbox gateway: invoices (P4, P15), idempotency, O3."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund_over_grpc, rid


async def _account_with_card(running: RunningGate, account_id: str, card: str) -> None:
    await running.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id=account_id))
    await running.admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id=account_id, primary=card)
    )


async def _sandbox_charges(running: RunningGate, account_id: str) -> int:
    count: int = await running.app.pool.fetchval(
        """SELECT count(*) FROM sandbox_charges s
           JOIN top_ups t ON s.idempotency_key = 'balance-gate-top-up-' || t.top_up_id
           WHERE t.account_id = $1""",
        account_id,
    )
    return count


async def test_p4_p15_a_manual_top_up_has_its_own_one_line_invoice(running: RunningGate) -> None:
    await _account_with_card(running, "shop", "pm_card_visa")
    first = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="shop", amount_micros=20 * USD, idempotency_key=rid())
    )
    second = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="shop", amount_micros=5 * USD, idempotency_key=rid())
    )
    assert first.status == admin_pb2.TOP_UP_STATUS_SUCCEEDED
    assert (first.credited_micros, first.payment_method) == (20 * USD, "pm_…visa")
    invoices = (
        await running.admin.ListInvoices(admin_pb2.ListInvoicesRequest(account_id="shop"))
    ).invoices
    assert [(i.top_up_id, i.amount_minor, i.currency) for i in invoices] == [
        (first.top_up_id, 2_000, "USD"),
        (second.top_up_id, 500, "USD"),
    ]
    assert invoices[0].line.split() == ["Top-up", "—", "manual", "$20.00"]
    assert invoices[1].invoice_number == invoices[0].invoice_number + 1
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="shop"))
    assert account.balance_micros == 25 * USD
    assert account.primary_payment_method == "pm_…visa"


async def test_a_replayed_top_up_charges_the_card_once(running: RunningGate) -> None:
    await _account_with_card(running, "replay", "pm_card_visa")
    request = admin_pb2.TopUpRequest(account_id="replay", amount_micros=USD, idempotency_key=rid())
    answers = await asyncio.gather(*(running.admin.TopUp(request) for _ in range(10)))
    assert {a.top_up_id for a in answers} == {answers[0].top_up_id}
    assert await _sandbox_charges(running, "replay") == 1
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="replay"))
    assert account.balance_micros == USD
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.admin.TopUp(
            admin_pb2.TopUpRequest(
                account_id="replay", amount_micros=2 * USD, idempotency_key=request.idempotency_key
            )
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_declined_card_fails_the_top_up_and_credits_nothing(running: RunningGate) -> None:
    await _account_with_card(running, "broke", "pm_card_insufficient_funds")
    answer = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="broke", amount_micros=USD, idempotency_key=rid())
    )
    assert (answer.status, answer.decline_reason) == (
        admin_pb2.TOP_UP_STATUS_FAILED,
        "insufficient_funds",
    )
    assert answer.invoice_number == 0
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="broke"))
    assert account.balance_micros == 0
    invoices = await running.admin.ListInvoices(admin_pb2.ListInvoicesRequest(account_id="broke"))
    assert list(invoices.invoices) == []


async def test_a_gateway_timeout_leaves_the_top_up_pending_and_charges_nothing(
    running: RunningGate,
) -> None:
    await _account_with_card(running, "timeout", "pm_card_network_error")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.admin.TopUp(
            admin_pb2.TopUpRequest(account_id="timeout", amount_micros=USD, idempotency_key=rid())
        )
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    top_ups = await running.admin.ListTopUps(admin_pb2.ListTopUpsRequest(account_id="timeout"))
    assert [t.status for t in top_ups.top_ups] == [admin_pb2.TOP_UP_STATUS_PENDING]
    assert await _sandbox_charges(running, "timeout") == 0


async def test_o3_a_top_up_pays_off_a_negative_balance_first(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "owing", 100_000)
    await running.admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id="owing", primary="pm_card_visa")
    )
    request = authorize_request("owing", 100_000)
    await running.gate.Authorize(request)
    await running.gate.Settle(
        gate_pb2.SettleRequest(
            account_id="owing", request_id=request.request_id, amount_micros=400_000
        )
    )
    await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="owing", amount_micros=USD, idempotency_key=rid())
    )
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="owing"))
    assert account.balance_micros == USD - 300_000


async def test_invoice_numbers_have_no_gaps_across_accounts(running: RunningGate) -> None:
    for account_id in ("north", "south"):
        await _account_with_card(running, account_id, "pm_card_visa")
    await asyncio.gather(
        *(
            running.admin.TopUp(
                admin_pb2.TopUpRequest(account_id=a, amount_micros=USD, idempotency_key=rid())
            )
            for a in ("north", "south") * 10
        )
    )
    numbers = [
        i.invoice_number
        for a in ("north", "south")
        for i in (
            await running.admin.ListInvoices(admin_pb2.ListInvoicesRequest(account_id=a))
        ).invoices
    ]
    assert sorted(numbers) == list(range(1, 21))


async def test_p5_enabling_auto_top_up_without_a_daily_cap_is_refused(running: RunningGate) -> None:
    await _account_with_card(running, "capless", "pm_card_visa")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.admin.SetAutoTopUp(
            admin_pb2.SetAutoTopUpRequest(
                account_id="capless", enabled=True, threshold_micros=5 * USD, amount_micros=20 * USD
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("daily_cap_micros:")
    account = await running.admin.SetAutoTopUp(
        admin_pb2.SetAutoTopUpRequest(
            account_id="capless",
            enabled=True,
            threshold_micros=5 * USD,
            amount_micros=20 * USD,
            daily_cap_micros=100 * USD,
        )
    )
    assert (account.auto_top_up.enabled, account.auto_top_up.daily_cap_micros) == (True, 100 * USD)


async def test_p3_auto_top_up_end_to_end_through_the_running_sidecar(running: RunningGate) -> None:
    """The sidecar's own worker picks up the trigger; GetAccount shows the state."""
    await fund_over_grpc(running.admin, "live", 10 * USD)
    await running.admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id="live", primary="pm_card_visa")
    )
    await running.admin.SetAutoTopUp(
        admin_pb2.SetAutoTopUpRequest(
            account_id="live",
            enabled=True,
            threshold_micros=5 * USD,
            amount_micros=20 * USD,
            daily_cap_micros=20 * USD,
        )
    )
    await running.gate.Authorize(authorize_request("live", 6 * USD))
    deadline = asyncio.get_running_loop().time() + 15
    while True:  # the worker runs in the background: wait for its result, bounded
        account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="live"))
        if account.balance_micros == 24 * USD:
            break
        assert asyncio.get_running_loop().time() < deadline, account
        await asyncio.sleep(0.02)
    auto = account.auto_top_up
    assert (auto.charged_today_micros, auto.charged_this_month_micros) == (20 * USD, 20 * USD)
    assert auto.daily_cap_reached
    assert (auto.consecutive_failures, auto.paused) == (0, False)
