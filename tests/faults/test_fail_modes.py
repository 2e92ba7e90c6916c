"""Redis cut, delayed or black-holed under a sidecar: the fail mode answers in time, and
every cent is accounted for once Redis is back (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from balance_gate import metrics
from balance_gate.constants import ScriptCode
from balance_gate.redis_store import VoidResult
from balance_gate.v1 import gate_pb2
from tests.conftest import RunningGate
from tests.faults.conftest import GateThroughProxy, assert_audit_clean
from tests.helpers import USD, authorize_request, fund_over_grpc, rid

DEADLINE_S = 1.0  # the proxies' gRPC deadline in these tests
FAST = {"redis_call_timeout_ms": 150, "breaker_failures": 3, "breaker_open_ms": 200}


async def _authorize_many(
    running: RunningGate, account_id: str, n: int, amount: int
) -> tuple[list[gate_pb2.AuthorizeResponse], list[float]]:
    """n concurrent Authorize calls; answers and latencies (all within DEADLINE_S or fail)."""

    async def one() -> tuple[gate_pb2.AuthorizeResponse, float]:
        started = time.perf_counter()
        answer = await running.gate.Authorize(
            authorize_request(account_id, amount), timeout=DEADLINE_S
        )
        return answer, time.perf_counter() - started

    results = await asyncio.gather(*(one() for _ in range(n)))
    return [r[0] for r in results], [r[1] for r in results]


def _p99(latencies: list[float]) -> float:
    return sorted(latencies)[int(len(latencies) * 0.99) - 1]


async def _until_recovered(running: RunningGate, account_id: str, amount: int) -> int:
    """Authorize until Redis answered and the outage journal is settled; return the
    micros allowed on the way (in fail_open some are allowed from the journal)."""
    allowed = 0
    for _ in range(500):
        answer = await running.gate.Authorize(authorize_request(account_id, amount))
        allowed += amount if answer.allowed else 0
        await running.app.gate.wait_recovered()
        if running.app.gate.outage_settled:
            return allowed
        await asyncio.sleep(0.01)  # polling for the breaker's next probe, not a race
    raise AssertionError("Redis never came back")


async def test_fail_closed_denies_within_deadline_when_redis_is_cut(
    gate_through_proxy: GateThroughProxy,
) -> None:
    async with gate_through_proxy(redis_fail_mode="fail_closed", **FAST) as (running, proxy):
        await fund_over_grpc(running.admin, "acme", 10 * USD)
        assert (await running.gate.Authorize(authorize_request("acme", USD))).allowed

        proxy.set("reset")
        answers, latencies = await _authorize_many(running, "acme", 200, 1_000)
        assert all(not a.allowed and a.code == "unavailable" for a in answers)
        assert _p99(latencies) < DEADLINE_S
        assert metrics.REDIS_CIRCUIT_OPEN._value.get() == 1

        # Open circuit: a dead Redis costs no timeout per request.
        _, open_latencies = await _authorize_many(running, "acme", 50, 1_000)
        assert max(open_latencies) < FAST["redis_call_timeout_ms"] / 1000

        proxy.set("pass")
        spent = USD + await _until_recovered(running, "acme", USD)
        account = await running.app.hot.read_account("acme")
        assert account is not None
        assert account.balance_micros == 10 * USD - spent
        await assert_audit_clean(running.app)


async def test_fail_open_allows_up_to_the_budget_and_debits_once_redis_is_back(
    gate_through_proxy: GateThroughProxy,
) -> None:
    budget = 50_000
    async with gate_through_proxy(
        redis_fail_mode="fail_open", fail_open_budget_micros=budget, **FAST
    ) as (running, proxy):
        await fund_over_grpc(running.admin, "acme", 10 * USD)
        await fund_over_grpc(running.admin, "beta", 10 * USD)
        assert (await running.gate.Authorize(authorize_request("acme", 1))).allowed

        proxy.set("blackhole")
        answers, latencies = await _authorize_many(running, "acme", 80, 1_000)
        allowed = [a for a in answers if a.allowed]
        assert len(allowed) == budget // 1_000
        assert all(a.code == "unavailable" for a in answers if not a.allowed)
        assert _p99(latencies) < DEADLINE_S
        # A retry of an allowed request during the outage is the same answer, charged once.
        retry = authorize_request("beta", 7_000, request_id=rid())
        first = await running.gate.Authorize(retry, timeout=DEADLINE_S)
        again = await running.gate.Authorize(retry, timeout=DEADLINE_S)
        assert first.allowed
        assert again.allowed
        assert again.replayed
        changed = authorize_request("beta", 8_000, request_id=retry.request_id)
        with pytest.raises(grpc.aio.AioRpcError) as mismatch:
            await running.gate.Authorize(changed, timeout=DEADLINE_S)
        assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        proxy.set("pass")
        recovered = await _until_recovered(running, "beta", 1)
        acme = await running.app.hot.read_account("acme")
        beta = await running.app.hot.read_account("beta")
        assert acme is not None
        assert beta is not None
        assert acme.balance_micros == 10 * USD - 1 - budget
        assert beta.balance_micros == 10 * USD - 7_000 - recovered
        await assert_audit_clean(running.app)


async def test_a_slow_redis_within_the_timeout_changes_nothing(
    gate_through_proxy: GateThroughProxy,
) -> None:
    # The proxy holds each chunk 20 ms, one after another: a pipeline of ~100 calls
    # crosses it in several chunks each way (a CI run saw 15 of 100 calls pass 150 ms).
    # 400 ms is still under half the proxies' 1 s deadline, and 20x the delay.
    within = {**FAST, "redis_call_timeout_ms": 400}
    async with gate_through_proxy(redis_fail_mode="fail_closed", **within) as (running, proxy):
        await fund_over_grpc(running.admin, "acme", 10 * USD)
        proxy.set("pass", delay_s=0.02)
        answers, latencies = await _authorize_many(running, "acme", 100, 1_000)
        assert all(a.allowed for a in answers)
        assert _p99(latencies) < DEADLINE_S
        proxy.set("pass")
        await assert_audit_clean(running.app)


async def test_fail_closed_never_charges_a_call_that_timed_out(
    gate_through_proxy: GateThroughProxy,
) -> None:
    """The call may reach Redis late; the proxy was told 'unavailable': once Redis
    answers, the request is settled to 0 if it ran, or fenced if it had not yet."""
    async with gate_through_proxy(
        redis_fail_mode="fail_closed", redis_call_timeout_ms=100, breaker_failures=100
    ) as (running, proxy):
        await fund_over_grpc(running.admin, "acme", 10 * USD)
        assert (await running.gate.Authorize(authorize_request("acme", 1))).allowed

        proxy.set("pass", delay_s=0.3)  # longer than the call timeout: it runs, late
        late = authorize_request("acme", USD)
        answer = await running.gate.Authorize(late, timeout=DEADLINE_S)
        assert not answer.allowed
        assert answer.code == "unavailable"
        proxy.set("pass")
        spent = await _until_recovered(running, "acme", 1)

        account = await running.app.hot.read_account("acme")
        assert account is not None
        assert account.balance_micros == 10 * USD - 1 - spent
        record = await running.app.hot.request_record("acme", late.request_id)
        assert record is not None
        assert record.startswith("v")  # voided: given back if it ran, fenced if not
        await assert_audit_clean(running.app)


async def test_settle_answers_unavailable_while_redis_is_cut(
    gate_through_proxy: GateThroughProxy,
) -> None:
    async with gate_through_proxy(**FAST) as (running, proxy):
        await fund_over_grpc(running.admin, "acme", 10 * USD)
        request = authorize_request("acme", USD)
        assert (await running.gate.Authorize(request)).allowed
        proxy.set("reset")
        settle = gate_pb2.SettleRequest(
            account_id="acme", request_id=request.request_id, amount_micros=500_000
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.gate.Settle(settle, timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        proxy.set("pass")
        await _until_recovered(running, "acme", 1)
        settled = await running.gate.Settle(settle)  # the proxy's retry
        assert settled.balance_micros == 10 * USD - 500_000 - 1
        await assert_audit_clean(running.app)


async def test_a_fenced_attempt_that_arrives_late_debits_nothing(
    gate_through_proxy: GateThroughProxy,
) -> None:
    async with gate_through_proxy() as (running, _):
        await fund_over_grpc(running.admin, "acme", USD)
        hot = running.app.hot
        assert await hot.void_attempt("acme", "late-1", "abc1") == VoidResult.FENCED
        late = await hot.authorize("acme", "late-1", 1_000, "", attempt="abc1")
        assert late.code == ScriptCode.VOIDED  # it finds its own fence: no debit
        assert await hot.void_attempt("acme", "late-1", "abc1") == VoidResult.DONE
        account = await hot.read_account("acme")
        assert account is not None
        assert account.balance_micros == USD
        # A retry (another attempt) is decided afresh and debited.
        retry = await running.gate.Authorize(authorize_request("acme", 1_000, "late-1"))
        assert retry.allowed
        assert not retry.replayed
        account = await hot.read_account("acme")
        assert account is not None
        assert account.balance_micros == USD - 1_000
        await assert_audit_clean(running.app)


async def test_fail_open_debits_of_an_unknown_account_never_reach_the_ledger(
    gate_through_proxy: GateThroughProxy,
) -> None:
    """Without Redis the gate cannot tell an unknown account: it allows within the
    budget, and drops those debits on replay instead of wedging the flusher."""
    async with gate_through_proxy(redis_fail_mode="fail_open", **FAST) as (running, proxy):
        await fund_over_grpc(running.admin, "acme", USD)
        proxy.set("reset")
        ghost = await running.gate.Authorize(authorize_request("ghost", 1_000), timeout=DEADLINE_S)
        real = await running.gate.Authorize(authorize_request("acme", 1_000), timeout=DEADLINE_S)
        assert ghost.allowed
        assert real.allowed
        proxy.set("pass")
        recovered = await _until_recovered(running, "acme", 1)
        account = await running.app.hot.read_account("acme")
        assert account is not None
        assert account.balance_micros == USD - 1_000 - recovered
        await assert_audit_clean(running.app)  # the flusher recorded acme's usage
