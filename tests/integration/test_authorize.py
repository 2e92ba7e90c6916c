"""Authorize over real gRPC against real Redis and Postgres (P1, P2, O3)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund_over_grpc, rid, wait_until_flushed


async def test_p1_third_request_is_denied_insufficient_balance(running: RunningGate) -> None:
    """P1: a request is allowed only while the balance can pay for it."""
    await fund_over_grpc(running.admin, "acme", 1 * USD)
    answers = [await running.gate.Authorize(authorize_request("acme", 400_000)) for _ in range(3)]
    assert [a.allowed for a in answers] == [True, True, False]
    assert [a.code for a in answers] == ["", "", "insufficient_balance"]
    assert [a.balance_micros for a in answers] == [600_000, 200_000, 200_000]
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="acme"))
    assert account.balance_micros == 200_000


async def test_p1_1000_concurrent_requests_never_overdraw(running: RunningGate) -> None:
    """P1 under concurrency: $5.00 pays for exactly 500 requests of $0.01."""
    await fund_over_grpc(running.admin, "crowd", 5 * USD)
    answers = await asyncio.gather(
        *(running.gate.Authorize(authorize_request("crowd", 10_000)) for _ in range(1_000))
    )
    allowed = [a for a in answers if a.allowed]
    assert len(allowed) == 500
    assert {a.code for a in answers if not a.allowed} == {"insufficient_balance"}
    assert min(a.balance_micros for a in answers) == 0
    # Each allowed answer saw a distinct balance: the debits were serialized.
    assert sorted(a.balance_micros for a in allowed) == list(range(0, 5 * USD, 10_000))
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="crowd"))
    assert account.balance_micros == 0

    await wait_until_flushed(running.app)
    used = await running.app.pg.usage_total("crowd")
    assert used == 5 * USD


async def test_p2_same_request_id_twice_debits_once(running: RunningGate) -> None:
    """P2: the same request is never charged twice; the replay says so."""
    await fund_over_grpc(running.admin, "dup", 1 * USD)
    request = authorize_request("dup", 250_000)
    first = await running.gate.Authorize(request)
    second = await running.gate.Authorize(request)
    assert (first.allowed, first.replayed, first.balance_micros) == (True, False, 750_000)
    assert (second.allowed, second.replayed, second.balance_micros) == (True, True, 750_000)


async def test_p2_same_request_id_concurrently_debits_once(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "dup2", 1 * USD)
    request = authorize_request("dup2", 100_000)
    answers = await asyncio.gather(*(running.gate.Authorize(request) for _ in range(50)))
    assert all(a.allowed for a in answers)
    assert sum(not a.replayed for a in answers) == 1
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="dup2"))
    assert account.balance_micros == 900_000
    await wait_until_flushed(running.app)
    assert await running.app.pg.usage_total("dup2") == 100_000


async def test_p2_replay_with_another_amount_is_refused(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "mismatch", 1 * USD)
    request_id = rid()
    await running.gate.Authorize(authorize_request("mismatch", 100_000, request_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.gate.Authorize(authorize_request("mismatch", 200_000, request_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "request_id" in (raised.value.details() or "")
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="mismatch"))
    assert account.balance_micros == 900_000


async def test_denied_request_records_nothing_and_its_retry_is_decided_afresh(
    running: RunningGate,
) -> None:
    await fund_over_grpc(running.admin, "retry", 100_000)
    request = authorize_request("retry", 300_000)
    denied = await running.gate.Authorize(request)
    assert (denied.allowed, denied.code) == (False, "insufficient_balance")
    await running.admin.Credit(
        admin_pb2.CreditRequest(
            account_id="retry", amount_micros=USD, reason="top-up", idempotency_key=rid()
        )
    )
    retried = await running.gate.Authorize(request)
    assert (retried.allowed, retried.replayed, retried.balance_micros) == (True, False, 800_000)
    await wait_until_flushed(running.app)
    assert await running.app.pg.usage_total("retry") == 300_000


async def test_zero_amount_is_a_free_request_end_to_end(running: RunningGate) -> None:
    """Lua would turn 0 into -0, which HINCRBY rejects: a free request must still work."""
    await fund_over_grpc(running.admin, "free", 1 * USD)
    request = authorize_request("free", 0)
    answer = await running.gate.Authorize(request)
    assert (answer.allowed, answer.balance_micros) == (True, USD)
    settled = await running.gate.Settle(
        gate_pb2.SettleRequest(account_id="free", request_id=request.request_id, amount_micros=0)
    )
    assert (settled.balance_micros, settled.delta_micros) == (USD, 0)
    await wait_until_flushed(running.app)
    assert await running.app.pg.usage_total("free") == 0


async def test_zero_balance_account_can_make_free_requests(running: RunningGate) -> None:
    await running.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="empty"))
    answer = await running.gate.Authorize(authorize_request("empty", 0))
    assert (answer.allowed, answer.balance_micros) == (True, 0)
    denied = await running.gate.Authorize(authorize_request("empty", 1))
    assert (denied.allowed, denied.code) == (False, "insufficient_balance")


async def test_unknown_account_is_denied_account_not_found(running: RunningGate) -> None:
    answer = await running.gate.Authorize(authorize_request("nobody-here", 1))
    assert (answer.allowed, answer.code, answer.balance_micros) == (False, "account_not_found", 0)


async def test_disabled_account_is_denied_until_enabled(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "paused", 1 * USD)
    allowed_before = authorize_request("paused", 100_000)
    await running.gate.Authorize(allowed_before)
    await running.admin.SetAccountStatus(
        admin_pb2.SetAccountStatusRequest(
            account_id="paused", status=admin_pb2.ACCOUNT_STATUS_DISABLED
        )
    )
    denied = await running.gate.Authorize(authorize_request("paused", 100_000))
    assert (denied.allowed, denied.code, denied.balance_micros) == (
        False,
        "account_disabled",
        900_000,
    )
    # An earlier allowed decision is still replayed as allowed: it was paid for.
    replay = await running.gate.Authorize(allowed_before)
    assert (replay.allowed, replay.replayed) == (True, True)
    await running.admin.SetAccountStatus(
        admin_pb2.SetAccountStatusRequest(
            account_id="paused", status=admin_pb2.ACCOUNT_STATUS_ACTIVE
        )
    )
    again = await running.gate.Authorize(authorize_request("paused", 100_000))
    assert (again.allowed, again.balance_micros) == (True, 800_000)


async def test_ids_with_colons_never_collide_across_accounts(running: RunningGate) -> None:
    """("a:b", "c") and ("a", "b:c") must be different requests, or one account's
    decision would be replayed for another without a debit."""
    await fund_over_grpc(running.admin, "a:b", 1 * USD)
    await fund_over_grpc(running.admin, "a", 1 * USD)
    first = await running.gate.Authorize(authorize_request("a:b", 100_000, "c"))
    second = await running.gate.Authorize(authorize_request("a", 100_000, "b:c"))
    assert (first.replayed, second.replayed) == (False, False)
    assert (first.balance_micros, second.balance_micros) == (900_000, 900_000)


async def test_scripts_are_reloaded_after_redis_forgets_them(
    running: RunningGate, redis_client: aioredis.Redis
) -> None:
    """EVALSHA answers NOSCRIPT after SCRIPT FLUSH (or a Redis restart): reload, retry."""
    await fund_over_grpc(running.admin, "noscript", USD)
    await redis_client.script_flush()
    answer = await running.gate.Authorize(authorize_request("noscript", 100_000))
    assert (answer.allowed, answer.balance_micros) == (True, 900_000)
