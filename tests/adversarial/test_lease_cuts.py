"""Issue 13 item 5: leases keep spending after a cut (C1, C4; docs/leasing.md).

A credit-line cut (limit lowered, to 0 here) or a disable must stop leased
decisions at the holder's next report at the latest: the write that makes the
cut raises the account's recall, renewals check status and floor, and a cut
made through the holder's own admin API returns its lease at once. After a cut
to 0 every allowed request is new debt; the debt allowed after the cut is
bounded by what the holder decided before its next report, and, across
sidecars, by the money leased at the moment of the cut.

Before the fix (measured): after a cut to 0 made on another sidecar, the holder
allowed 1 one-cent request before its next report and all 100 of 100 after it
(the report renewed the lease); with two holders the leases ($2 each) never
came back; a cut or disable through the holder's own admin left its lease in
place; a status or floor written with no recall (as a load writes them) was
renewed over. A disable made elsewhere already recalled (set_fields.lua): those
cases passed before and stay as guards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from balance_gate.app import App
from balance_gate.credit_lines import CreditLine
from balance_gate.leases import LeaseManager
from balance_gate.settings import Settings
from tests.helpers import USD, fund, rid, wait_until_flushed, with_settings
from tests.integration.test_leases import eventually, sidecar

CENT = 10_000
LIMIT = 10 * USD
LEASE = 2 * USD  # well inside half of the free balance, so granted in full


def _leasing(settings: Settings) -> Settings:
    # Idle leases are not returned on their own during a test: only a recall,
    # a renewal's check or a release may take them back.
    return with_settings(
        settings,
        lease_accounts="*",
        lease_min_rate=1,
        lease_report_interval_ms=5,
        lease_recall_wait_ms=500,
        lease_idle_ms=60_000,
    )


def _line(account_id: str, limit_micros: int) -> CreditLine:
    return CreditLine(
        account_id=account_id,
        limit_micros=limit_micros,
        deposit_micros=0,
        review_every_days=30,
        next_review_on=dt.date.today(),
        high_cost_capabilities=(),
    )


def leases_of(app: App) -> LeaseManager:
    assert app.leases is not None
    return app.leases


async def _on_credit_with_a_lease(app: App, account_id: str) -> None:
    """$1 prepaid and spent, a $10 line, and a $2 lease: every further debit is credit."""
    await fund(app, account_id, 1 * USD)
    await app.credit_lines.set(_line(account_id, LIMIT))
    assert (await app.gate.authorize(account_id, rid(), 1 * USD, "")).allowed
    assert await leases_of(app).acquire(account_id, LEASE) == LEASE


async def _hot(app: App, account_id: str) -> dict[str, int]:
    values = await app.redis.hmget(app.hot.keys.account(account_id), ["balance", "leased", "floor"])
    return {
        name: int(value or 0)
        for name, value in zip(("balance", "leased", "floor"), values, strict=True)
    }


async def _holder_entry(app: App, account_id: str) -> object:
    """This sidecar's entry in the account's lease hash (None: it holds no lease)."""
    return await app.redis.hget(app.hot.keys.hot(account_id).leases, leases_of(app).holder)


async def _allowed(app: App, account_id: str, count: int) -> int:
    return sum(
        [(await app.gate.authorize(account_id, rid(), CENT, "")).allowed for _ in range(count)]
    )


Cut = Callable[[App, str], Awaitable[object]]


async def _cut_line(app: App, account_id: str) -> object:
    return await app.credit_lines.set(_line(account_id, 0))


async def _disable(app: App, account_id: str) -> object:
    return await app.accounts.set_status(account_id, "disabled")


CUTS = [pytest.param(_cut_line, id="limit-cut-to-0"), pytest.param(_disable, id="disable")]


@pytest.mark.parametrize("cut", CUTS)
async def test_issue_13_item_5_a_cut_elsewhere_stops_the_holder_at_its_next_report(
    settings: Settings, cut: Cut
) -> None:
    """C1/C4: after a cut made on another sidecar, the holder allows from its lease only
    until its next report; what it allowed before is the debt that was in flight."""
    leasing = _leasing(settings)
    async with (
        sidecar(leasing, reporting=False) as holder,
        sidecar(leasing, reporting=False) as admin,
    ):
        await _on_credit_with_a_lease(holder, "cut-elsewhere")
        await cut(admin, "cut-elsewhere")
        before_report = await _allowed(holder, "cut-elsewhere", 1)  # in flight: in memory
        await leases_of(holder).report_due()  # the holder's next report
        after_report = await _allowed(holder, "cut-elsewhere", 100)
        print(f"allowed after the cut: {before_report} before the report, {after_report} after")
        assert after_report == 0, f"{after_report} cents of debt allowed after the next report"
        await eventually(lambda: _no_lease(holder, "cut-elsewhere"))
        hot = await _hot(holder, "cut-elsewhere")
        # The only debt since the cut is what the holder decided before its report.
        assert hot["balance"] == -before_report * CENT


async def _no_lease(app: App, account_id: str) -> bool:
    hot = await _hot(app, account_id)
    return hot["leased"] == 0 and leases_of(app).held(account_id) == 0


@pytest.mark.parametrize("cut", CUTS)
async def test_issue_13_item_5_a_cut_through_the_holders_own_admin_returns_its_lease_at_once(
    settings: Settings, cut: Cut
) -> None:
    """The sidecar that makes the cut holds a lease on the account: it gives it back
    before the cut returns, so not one more request is allowed from it."""
    async with sidecar(_leasing(settings), reporting=False) as holder:
        await _on_credit_with_a_lease(holder, "cut-here")
        await cut(holder, "cut-here")
        assert leases_of(holder).held("cut-here") == 0
        assert await _holder_entry(holder, "cut-here") is None
        assert (await _hot(holder, "cut-here"))["leased"] == 0
        assert await _allowed(holder, "cut-here", 20) == 0
        assert (await _hot(holder, "cut-here"))["balance"] == 0  # no new debt


async def test_issue_13_item_5_a_renewal_of_a_disabled_account_returns_the_lease(
    settings: Settings,
) -> None:
    """Renewals check status: a status written without a recall (as a load or reconcile
    from Postgres writes it, sync_account.lua) still ends the lease at its next report."""
    async with sidecar(_leasing(settings), reporting=False) as holder:
        await _on_credit_with_a_lease(holder, "renew-disabled")
        await holder.redis.hset(holder.hot.keys.account("renew-disabled"), "status", "disabled")
        assert await _allowed(holder, "renew-disabled", 1) == 1  # before the report
        await leases_of(holder).report_due()
        assert await _holder_entry(holder, "renew-disabled") is None, "lease renewed"
        assert await _allowed(holder, "renew-disabled", 20) == 0
        await eventually(lambda: _no_lease(holder, "renew-disabled"))
        assert (await _hot(holder, "renew-disabled"))["balance"] == -CENT


async def test_issue_13_item_5_a_renewal_never_keeps_money_below_the_floor(
    settings: Settings,
) -> None:
    """Renewals check the floor: a floor raised without a recall (a load or reconcile
    reading the cut line) takes back, at the next report, what the lease holds below it."""
    async with sidecar(_leasing(settings), reporting=False) as holder:
        await _on_credit_with_a_lease(holder, "renew-floor")
        await holder.redis.hset(holder.hot.keys.account("renew-floor"), "floor", "0")
        assert await _allowed(holder, "renew-floor", 1) == 1  # before the report
        await leases_of(holder).report_due()
        hot = await _hot(holder, "renew-floor")
        print(f"after the renewal: {hot}")
        # All of the lease was below the floor: it came back (the cent was in flight).
        assert hot["leased"] == 0, f"the renewal kept leased money below the floor: {hot}"
        assert await _allowed(holder, "renew-floor", 20) == 0
        await eventually(lambda: _no_lease(holder, "renew-floor"))
        assert (await _hot(holder, "renew-floor"))["balance"] == -CENT


@asynccontextmanager
async def _traffic(apps: list[App], account_id: str, per_app: int) -> AsyncIterator[list[int]]:
    """Sequential one-cent requests on each app, `per_app` at most each; yields the
    running count of allowed answers per app."""
    allowed = [0] * len(apps)

    async def run(i: int) -> None:
        for _ in range(per_app):
            allowed[i] += (await apps[i].gate.authorize(account_id, rid(), CENT, "")).allowed
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(run(i)) for i in range(len(apps))]
    try:
        yield allowed
    finally:
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("cut", CUTS)
async def test_issue_13_item_5_debt_after_a_cut_is_bounded_by_what_was_leased(
    settings: Settings, cut: Cut
) -> None:
    """Two leasing sidecars with reporters running and traffic on both, the cut made on a
    third: every lease comes back on its own (no traffic exhausts them: each sidecar sends
    fewer cents than its lease holds), and the debt allowed after the cut is at most what
    was leased at the moment of the cut."""
    leasing = _leasing(settings)
    async with AsyncExitStack() as stack:
        holders = [await stack.enter_async_context(sidecar(leasing)) for _ in range(2)]
        admin = await stack.enter_async_context(sidecar(leasing, reporting=False))
        await fund(admin, "cut-live", 1 * USD)
        await admin.credit_lines.set(_line("cut-live", LIMIT))
        assert (await admin.gate.authorize("cut-live", rid(), 1 * USD, "")).allowed
        for holder in holders:
            assert await leases_of(holder).acquire("cut-live", LEASE) == LEASE
        per_app = LEASE // CENT // 4  # cannot exhaust a lease, with or without the cut
        async with _traffic(holders, "cut-live", per_app) as allowed:
            await asyncio.sleep(0)
            allowed_before = sum(allowed)
            leased_at_cut = (await _hot(admin, "cut-live"))["leased"]
            await cut(admin, "cut-live")
            await eventually(lambda: _all_returned(admin, holders, "cut-live"), timeout_s=15)
        debt_after_cut = (sum(allowed) - allowed_before) * CENT
        print(f"leased at the cut {leased_at_cut}, debt allowed after it {debt_after_cut}")
        assert debt_after_cut <= leased_at_cut
        assert all([await _allowed(h, "cut-live", 10) == 0 for h in holders])
        for holder in holders:
            await leases_of(holder).close()
        await wait_until_flushed(admin)
        hot = await _hot(admin, "cut-live")
        assert hot["balance"] == -(sum(allowed) * CENT)


async def _all_returned(admin: App, holders: list[App], account_id: str) -> bool:
    if (await _hot(admin, account_id))["leased"] != 0:
        return False
    return all(leases_of(h).held(account_id) == 0 for h in holders)
