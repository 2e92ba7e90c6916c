"""Issue 12 item 7: the leased path and the bounds.

- A replay on a lease with another amount was allowed and never charged; the
  Redis path answers FAILED_PRECONDITION, and so must the lease.
- The lease cooldown map (refused grants) was never pruned.
- The fail_closed void journal had no cap: at the cap the sidecar stops sending
  calls (answering 'unavailable') until the journal drains, so no void is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import cast

import pytest

from balance_gate import leases as leases_module
from balance_gate.app import App
from balance_gate.errors import FailedPrecondition
from balance_gate.leases import LeaseConfig, LeaseManager
from balance_gate.redis_store import Call, LeaseGrant, RedisStore, ScriptBatcher
from balance_gate.settings import Settings
from tests.faults.conftest import (  # noqa: F401 - the fixture is used by name
    GateThroughProxy,
    assert_audit_clean,
    gate_through_proxy,
)
from tests.helpers import (
    USD,
    authorize_request,
    fund,
    fund_over_grpc,
    ledger_balance,
    rid,
    wait_until_flushed,
    with_settings,
)
from tests.integration.test_leases import leases_of, sidecar

CENT = 10_000


def leasing_sidecar(settings: Settings) -> AbstractAsyncContextManager[App]:
    """An App that leases every account, with its lease reporter and flusher running."""
    return sidecar(
        with_settings(settings, lease_accounts="*", lease_min_rate=1, lease_report_interval_ms=5)
    )


async def test_issue_12_item_7_a_leased_replay_of_a_redis_decision_with_another_amount(
    settings: Settings,
) -> None:
    """Decided on the normal path before the lease existed, then replayed on the lease
    with a bigger amount: it was allowed locally, and its report found the request
    record and charged nothing."""
    async with leasing_sidecar(settings) as app:
        await fund(app, "acct", USD)
        first = await app.gate.authorize("acct", "r1", CENT, "")
        assert first.allowed
        assert not first.replayed
        assert await leases_of(app).acquire("acct", 20 * CENT) == 20 * CENT
        with pytest.raises(FailedPrecondition):
            await app.gate.authorize("acct", "r1", 5 * CENT, "")
        same = await app.gate.authorize("acct", "r1", CENT, "")
        assert same.allowed
        assert same.replayed
        await leases_of(app).close()
        await wait_until_flushed(app)
        assert await ledger_balance(app, "acct") == USD - CENT


async def test_issue_12_item_7_a_leased_replay_after_the_lease_was_returned(
    settings: Settings,
) -> None:
    """Allowed from a lease, the lease returned (its memory of request ids with it),
    then replayed on a new lease with another amount: allowed and never charged."""
    async with leasing_sidecar(settings) as app:
        await fund(app, "acct", USD)
        leases = leases_of(app)
        assert await leases.acquire("acct", 20 * CENT) == 20 * CENT
        first = await app.gate.authorize("acct", "r1", CENT, "")
        assert first.allowed
        await leases.release("acct")
        assert leases.held("acct") == 0
        assert await leases.acquire("acct", 20 * CENT) > 0
        with pytest.raises(FailedPrecondition):
            await app.gate.authorize("acct", "r1", 7 * CENT, "")
        await leases.close()
        await wait_until_flushed(app)
        assert await ledger_balance(app, "acct") == USD - CENT


class _RefusingRedis:
    """Every lease grant is refused (as for accounts with nothing to lend)."""

    async def lease_take(
        self, holder: str, account_id: str, want: int, smallest: int, ttl_ms: int
    ) -> LeaseGrant:
        return LeaseGrant(0, 0, 0)


async def test_issue_12_item_7_the_lease_cooldown_map_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each refused grant left an entry in _cooldown forever: one per account ever
    refused. It must stay within its bound, dropping expired entries first."""
    limit = 100
    monkeypatch.setattr(leases_module, "_MAX_COOLDOWNS", limit, raising=False)
    now = [0.0]
    manager = LeaseManager(
        cast(RedisStore, _RefusingRedis()),
        LeaseConfig(("*",), 1, 1.0, 1_000, 0.02, 1.0),
        holder="test",
        clock=lambda: now[0],
    )
    for n in range(10 * limit):
        assert await manager.acquire(f"acct-{n}", CENT) == 0
        now[0] += 0.0001  # all refused within one cooldown
    assert len(manager._cooldown) <= limit
    now[0] += 60.0  # every cooldown is over: they are pruned, not kept to the bound
    assert await manager.acquire("late", CENT) == 0
    assert len(manager._cooldown) <= 2


def _count_authorize_sends(app: App) -> list[str]:
    batcher: ScriptBatcher = app.hot._authorize
    sent: list[str] = []
    original = batcher.call

    def call(keys: Sequence[str], args: Sequence[str]) -> Call:
        sent.append(args[4])  # the request id
        return original(keys, args)

    batcher.call = call  # type: ignore[method-assign]
    return sent


async def test_issue_12_item_7_the_void_journal_is_capped_and_never_drops_a_void(
    gate_through_proxy: GateThroughProxy,  # noqa: F811
) -> None:
    """fail_closed journaled a void for every timed-out call, without limit. With the cap,
    the sidecar sends no call it could not journal: past it, requests are answered
    'unavailable' without reaching Redis until the journal drains."""
    cap = 5
    async with gate_through_proxy(
        redis_fail_mode="fail_closed",
        redis_call_timeout_ms=150,
        breaker_failures=1_000,
        outage_max_voids=cap,
    ) as (running, proxy):
        await fund_over_grpc(running.admin, "acme", 10 * USD)
        assert (await running.gate.Authorize(authorize_request("acme", 1))).allowed
        sent = _count_authorize_sends(running.app)
        journal = running.app.gate._outage

        proxy.set("blackhole")
        answers = await asyncio.gather(
            *(running.gate.Authorize(authorize_request("acme", CENT), timeout=5) for _ in range(40))
        )
        assert all(not a.allowed and a.code == "unavailable" for a in answers)
        assert journal.entries <= cap
        assert len(sent) <= cap, "calls past the cap were sent and could not be journaled"
        again = await running.gate.Authorize(authorize_request("acme", CENT), timeout=5)
        assert (again.allowed, again.code) == (False, "unavailable")
        assert len(sent) <= cap

        proxy.set("reset")
        proxy.set("pass")
        allowed = 0
        for _ in range(500):  # the journal drains, then calls go out again
            answer = await running.gate.Authorize(authorize_request("acme", 1, rid()))
            allowed += answer.allowed
            await running.app.gate.wait_recovered()
            if answer.allowed and running.app.gate.outage_settled:
                break
            await asyncio.sleep(0.01)  # polling for the journal's replay, not a race
        assert running.app.gate.outage_settled
        for request_id in sent:  # every call sent was voided: none debits if it arrives
            assert await running.app.hot.request_record("acme", request_id) is not None
        account = await running.app.hot.read_account("acme")
        assert account is not None
        assert account.balance_micros == 10 * USD - 1 - allowed
        await assert_audit_clean(running.app)
