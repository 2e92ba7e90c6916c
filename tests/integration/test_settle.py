"""Settle: the final cost of an authorized request (O3 for settles below zero)."""

from __future__ import annotations

import grpc
import pytest

from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund_over_grpc, rid, wait_until_flushed


def settle(account_id: str, request_id: str, amount_micros: int) -> gate_pb2.SettleRequest:
    return gate_pb2.SettleRequest(
        account_id=account_id, request_id=request_id, amount_micros=amount_micros
    )


async def _balance(running: RunningGate, account_id: str) -> int:
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id=account_id))
    return account.balance_micros


async def test_settle_higher_debits_the_difference(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "up", 1 * USD)
    request = authorize_request("up", 100_000)
    await running.gate.Authorize(request)
    answer = await running.gate.Settle(settle("up", request.request_id, 250_000))
    assert (answer.balance_micros, answer.delta_micros, answer.replayed) == (
        750_000,
        150_000,
        False,
    )
    await wait_until_flushed(running.app)
    assert await running.app.pg.usage_total("up") == 250_000


async def test_settle_lower_credits_the_difference_back(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "down", 1 * USD)
    request = authorize_request("down", 400_000)
    await running.gate.Authorize(request)
    answer = await running.gate.Settle(settle("down", request.request_id, 150_000))
    assert (answer.balance_micros, answer.delta_micros) == (850_000, -250_000)
    await wait_until_flushed(running.app)
    assert await running.app.pg.usage_total("down") == 150_000
    account = await running.app.pg.get_account("down")
    assert account is not None
    assert account.ledger_balance_micros == 850_000


async def test_o3_settle_may_take_the_balance_below_zero(running: RunningGate) -> None:
    """O3: delayed billing can push a balance below zero; new requests are then denied."""
    await fund_over_grpc(running.admin, "neg", 100_000)
    request = authorize_request("neg", 100_000)
    await running.gate.Authorize(request)
    answer = await running.gate.Settle(settle("neg", request.request_id, 300_000))
    assert answer.balance_micros == -200_000
    denied = await running.gate.Authorize(authorize_request("neg", 1))
    assert (denied.allowed, denied.code, denied.balance_micros) == (
        False,
        "insufficient_balance",
        -200_000,
    )
    # A credit pays off the negative balance first (O3).
    await running.admin.Credit(
        admin_pb2.CreditRequest(
            account_id="neg", amount_micros=USD, reason="transfer", idempotency_key=rid()
        )
    )
    assert await _balance(running, "neg") == 800_000


async def test_settle_twice_with_the_same_amount_changes_nothing(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "twice", 1 * USD)
    request = authorize_request("twice", 100_000)
    await running.gate.Authorize(request)
    first = await running.gate.Settle(settle("twice", request.request_id, 120_000))
    second = await running.gate.Settle(settle("twice", request.request_id, 120_000))
    assert (first.delta_micros, first.replayed) == (20_000, False)
    assert (second.balance_micros, second.delta_micros, second.replayed) == (880_000, 20_000, True)
    assert await _balance(running, "twice") == 880_000


async def test_settle_again_with_another_amount_is_failed_precondition(
    running: RunningGate,
) -> None:
    await fund_over_grpc(running.admin, "final", 1 * USD)
    request = authorize_request("final", 100_000)
    await running.gate.Authorize(request)
    await running.gate.Settle(settle("final", request.request_id, 120_000))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.gate.Settle(settle("final", request.request_id, 130_000))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already settled at 120000" in (raised.value.details() or "")
    assert await _balance(running, "final") == 880_000


async def test_settle_of_an_unknown_or_denied_request_is_not_found(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "ghost", 100_000)
    denied = authorize_request("ghost", 500_000)
    assert not (await running.gate.Authorize(denied)).allowed
    for request_id in (rid(), denied.request_id):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.gate.Settle(settle("ghost", request_id, 1))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "request_id" in (raised.value.details() or "")
    assert await _balance(running, "ghost") == 100_000


async def test_settle_for_an_unknown_account_is_not_found(running: RunningGate) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.gate.Settle(settle("no-such-account", rid(), 1))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_replayed_authorize_after_settle_is_still_allowed(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "after", 1 * USD)
    request = authorize_request("after", 100_000)
    await running.gate.Authorize(request)
    await running.gate.Settle(settle("after", request.request_id, 50_000))
    replay = await running.gate.Authorize(request)
    assert (replay.allowed, replay.replayed, replay.balance_micros) == (True, True, 950_000)
