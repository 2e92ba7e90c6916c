"""Auto top-up with the sandbox gateway: P3, P5, P9..P12, O1, O3, one charge per dip.

The worker is driven by hand (handle_new) so every step is deterministic.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from balance_gate.app import App
from balance_gate.errors import InvalidArgument
from balance_gate.fx import convert
from balance_gate.keys import shard_of
from balance_gate.settings import Settings
from balance_gate.top_up_store import TopUpRow
from tests.helpers import USD, fund, rid

RETRY_NOW = 0.0  # tests re-run triggers at once instead of waiting the retry interval


async def _with_auto_top_up(
    app: App,
    account_id: str,
    *,
    balance: int = 10 * USD,
    card: str = "pm_card_visa",
    backup: str = "",
    threshold: int = 5 * USD,
    amount: int = 20 * USD,
    daily_cap: int = 100 * USD,
    monthly_cap: int = 0,
) -> None:
    await app.hot.ensure_top_up_groups()
    await fund(app, account_id, balance)
    await app.topups.set_payment_methods(account_id, card, backup)
    await app.topups.set_auto_top_up(account_id, True, threshold, amount, daily_cap, monthly_cap)


async def _run_triggers(app: App) -> int:
    """Handle every trigger raised so far; return how many there were."""
    handled = 0
    while n := await app.top_up_worker.handle_new(None):
        handled += n
    return handled


async def _balance(app: App, account_id: str) -> int:
    hot = await app.hot.read_account(account_id)
    assert hot is not None
    return hot.balance_micros


async def _top_ups(app: App, account_id: str) -> list[TopUpRow]:
    return await app.topups.list_top_ups(account_id)


async def _charges(app: App, account_id: str) -> int:
    count: int = await app.pool.fetchval(
        """SELECT count(*) FROM sandbox_charges s JOIN top_ups t
             ON s.idempotency_key = 'balance-gate-top-up-' || t.top_up_id
           WHERE t.account_id = $1""",
        account_id,
    )
    return count


def _paused_count(reason: str) -> float:
    sample = REGISTRY.get_sample_value("balance_gate_auto_top_ups_paused_total", {"reason": reason})
    return sample or 0.0


async def test_p3_falling_under_the_threshold_charges_the_default_card(app: App) -> None:
    await _with_auto_top_up(app, "p3")
    decision = await app.gate.authorize("p3", rid(), 6 * USD, "")
    assert (decision.allowed, decision.balance_micros) == (True, 4 * USD)  # never waits
    assert await _run_triggers(app) == 1
    assert await _balance(app, "p3") == 24 * USD
    [top_up] = await _top_ups(app, "p3")
    assert (top_up.kind, top_up.status, top_up.amount_micros) == ("auto", "succeeded", 20 * USD)
    [invoice] = await app.topups.list_invoices("p3")
    assert invoice.line.split() == ["Top-up", "—", "auto,", "threshold", "$5", "$20.00"]


async def test_p9_a_denied_request_fails_at_once_and_still_triggers(app: App) -> None:
    await _with_auto_top_up(app, "p9", balance=USD)
    denied = await app.gate.authorize("p9", rid(), 2 * USD, "")
    assert (denied.allowed, denied.code) == (False, "insufficient_balance")
    assert await _run_triggers(app) == 1
    assert await _balance(app, "p9") == 21 * USD
    again = await app.gate.authorize("p9", rid(), 2 * USD, "")
    assert again.allowed


async def test_200_concurrent_requests_crossing_the_threshold_charge_once(app: App) -> None:
    await _with_auto_top_up(app, "herd", balance=6 * USD)
    decisions = await asyncio.gather(
        *(app.gate.authorize("herd", rid(), 10_000, "") for _ in range(200))
    )
    assert all(d.allowed for d in decisions)
    assert await _run_triggers(app) == 1
    assert await _charges(app, "herd") == 1
    assert await _balance(app, "herd") == 6 * USD - 200 * 10_000 + 20 * USD


async def test_two_sidecars_charge_once_per_trigger(settings: Settings, app: App) -> None:
    await _with_auto_top_up(app, "pair", balance=6 * USD)
    other = await App.open(settings, migrate=False)
    try:
        await asyncio.gather(
            *(
                (app if i % 2 else other).gate.authorize("pair", rid(), 20_000, "")
                for i in range(100)
            )
        )
        handled = await asyncio.gather(
            app.top_up_worker.handle_new(None), other.top_up_worker.handle_new(None)
        )
        assert sum(handled) == 1
        assert await _charges(app, "pair") == 1
    finally:
        await other.close()


async def test_o3_a_deep_negative_balance_is_closed_in_one_charge_of_whole_amounts(
    app: App,
) -> None:
    await _with_auto_top_up(app, "deep", balance=USD)
    request_id = rid()
    await app.gate.authorize("deep", request_id, USD, "")
    await app.gate.settle("deep", request_id, 51 * USD)  # balance -$50
    assert await _run_triggers(app) == 1
    [top_up] = await _top_ups(app, "deep")
    assert top_up.amount_micros == 60 * USD  # 3 x $20 lifts -$50 over the $5 threshold
    assert await _balance(app, "deep") == 10 * USD


async def test_p5_the_daily_cap_stops_charges_until_the_next_day(app: App) -> None:
    await _with_auto_top_up(app, "capped", daily_cap=40 * USD)
    start = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)
    app.topups.clock = lambda: start
    for amount in (6 * USD, 20 * USD):  # $10 -> $4 -> +$20 -> $4 -> +$20
        assert (await app.gate.authorize("capped", rid(), amount, "")).allowed
        assert await app.topups.auto("capped", RETRY_NOW) == "succeeded"
    assert await _charges(app, "capped") == 2
    await app.gate.authorize("capped", rid(), 20 * USD, "")  # balance now $4: under $5
    assert await app.topups.auto("capped", RETRY_NOW) == "daily_cap"
    assert await _charges(app, "capped") == 2
    denied = await app.gate.authorize("capped", rid(), 5 * USD, "")
    assert (denied.allowed, denied.code) == (False, "insufficient_balance")
    settings = await app.topups.auto_top_up("capped")
    assert settings is not None
    assert settings.last_stop_reason == "daily_cap"

    app.topups.clock = lambda: start + dt.timedelta(days=1)
    assert await app.topups.auto("capped", RETRY_NOW) == "succeeded"
    assert await _charges(app, "capped") == 3


async def test_p5_the_cap_cuts_a_gap_closing_charge_to_what_fits(app: App) -> None:
    await _with_auto_top_up(app, "fit", balance=USD, daily_cap=40 * USD)
    request_id = rid()
    await app.gate.authorize("fit", request_id, USD, "")
    await app.gate.settle("fit", request_id, 81 * USD)  # -$80 would need 5 x $20
    assert await app.topups.auto("fit", RETRY_NOW) == "succeeded"
    [top_up] = await _top_ups(app, "fit")
    assert top_up.amount_micros == 40 * USD


async def test_o1_the_monthly_cap_stops_charges(app: App) -> None:
    await _with_auto_top_up(app, "monthly", daily_cap=100 * USD, monthly_cap=40 * USD)
    start = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)
    for day, amount in enumerate((6 * USD, 20 * USD, 20 * USD)):
        app.topups.clock = lambda day=day: start + dt.timedelta(days=day)  # type: ignore[misc]
        assert (await app.gate.authorize("monthly", rid(), amount, "")).allowed
        await app.topups.auto("monthly", RETRY_NOW)
    assert await _charges(app, "monthly") == 2
    settings = await app.topups.auto_top_up("monthly")
    assert settings is not None
    assert settings.last_stop_reason == "monthly_cap"


async def test_p10_p11_three_failures_pause_auto_top_up_until_resumed(
    app: App, redis_client: aioredis.Redis
) -> None:
    await _with_auto_top_up(app, "declined", card="pm_card_declined")
    paused_before = _paused_count("failures")
    await app.gate.authorize("declined", rid(), 6 * USD, "")
    assert await _run_triggers(app) == 1
    results = [await app.topups.auto("declined", RETRY_NOW) for _ in range(2)]
    assert results == ["generic_decline"] * 2
    assert _paused_count("failures") - paused_before == 1  # what the alert counts
    settings = await app.topups.auto_top_up("declined")
    assert settings is not None
    assert (settings.paused, settings.consecutive_failures) == (True, 3)
    assert settings.last_decline_reason == "generic_decline"
    # Paused: the debit script raises no trigger any more.
    assert await redis_client.hget(app.hot.keys.account("declined"), "at_on") == b"0"
    await app.gate.authorize("declined", rid(), USD, "")
    assert await _run_triggers(app) == 0

    await app.topups.set_payment_methods("declined", "pm_card_visa", "")
    await app.topups.resume("declined")
    await app.gate.authorize("declined", rid(), 0, "")
    assert await _run_triggers(app) == 1
    assert await _balance(app, "declined") == 23 * USD


async def test_p10_the_next_request_retries_the_same_card_after_the_interval(app: App) -> None:
    await _with_auto_top_up(app, "retry", card="pm_card_succeed_0_then_decline")
    await app.gate.authorize("retry", rid(), 6 * USD, "")
    assert await _run_triggers(app) == 1
    # Within the retry interval, more requests raise no trigger (the card is not hammered).
    await app.hot.hold_top_up_trigger("retry", 30)
    await app.gate.authorize("retry", rid(), USD, "")
    assert await _run_triggers(app) == 0
    await app.hot.hold_top_up_trigger("retry", 0)  # the interval is over
    await app.gate.authorize("retry", rid(), 0, "")
    assert await _run_triggers(app) == 1
    attempts = await _top_ups(app, "retry")
    assert [t.payment_method for t in attempts] == ["pm_card_succeed_0_then_decline"] * 2


async def test_p12_the_backup_card_is_tried_after_three_primary_failures(app: App) -> None:
    await _with_auto_top_up(app, "backup", card="pm_card_fraudulent", backup="pm_card_visa")
    await app.gate.authorize("backup", rid(), 6 * USD, "")
    results = [await app.topups.auto("backup", RETRY_NOW) for _ in range(4)]
    assert results == ["fraudulent"] * 3 + ["succeeded"]
    methods = [t.payment_method for t in await _top_ups(app, "backup")]
    assert methods == ["pm_card_fraudulent"] * 3 + ["pm_card_visa"]
    settings = await app.topups.auto_top_up("backup")
    assert settings is not None
    assert (settings.paused, settings.consecutive_failures) == (False, 0)


async def test_a_crash_between_charge_and_credit_is_resolved_with_one_charge(app: App) -> None:
    await _with_auto_top_up(app, "crash")
    await app.gate.authorize("crash", rid(), 6 * USD, "")
    # The worker planned the top-up and the card was charged, then the process died.
    hot = await app.hot.read_account("crash")
    assert hot is not None
    plan = await app.topups._store.plan_auto("crash", hot.balance_micros, app.topups.clock())
    assert plan.top_up is not None
    await app.topups.gateway.charge("pm_card_visa", 2_000, "USD", plan.top_up.gateway_key)

    assert await app.topups.resolve_stale(0, RETRY_NOW) == 1
    assert await app.topups.resolve_stale(0, RETRY_NOW) == 0
    assert await _charges(app, "crash") == 1
    assert await _balance(app, "crash") == 24 * USD
    assert len(await app.topups.list_invoices("crash")) == 1


async def _planned(app: App, account_id: str) -> TopUpRow:
    """Raise a trigger and plan its top-up, as the worker does before it charges."""
    await _with_auto_top_up(app, account_id)
    await app.gate.authorize(account_id, rid(), 6 * USD, "")
    hot = await app.hot.read_account(account_id)
    assert hot is not None
    plan = await app.topups._store.plan_auto(account_id, hot.balance_micros, app.topups.clock())
    assert plan.top_up is not None
    return plan.top_up


async def test_a_crash_after_planning_before_the_charge_charges_once(app: App) -> None:
    await _planned(app, "crash-1")
    assert await _charges(app, "crash-1") == 0
    assert await app.topups.resolve_stale(0, RETRY_NOW) == 1
    assert (await _charges(app, "crash-1"), await _balance(app, "crash-1")) == (1, 24 * USD)
    # The trigger itself is redelivered too: it finds the dip already covered.
    assert await app.topups.auto("crash-1", RETRY_NOW) == "above_threshold"
    assert await _charges(app, "crash-1") == 1


async def test_a_crash_after_the_ledger_commit_before_redis_credits_once(app: App) -> None:
    top_up = await _planned(app, "crash-3")
    charge = await app.topups.gateway.charge("pm_card_visa", 2_000, "USD", top_up.gateway_key)
    conversion = convert(top_up.amount_micros, "USD", "USD", Decimal(1), Decimal(1))
    async with app.pg.shard_lock([shard_of("crash-3")], exclusive=False) as conn:
        await app.topups._store.succeed(
            conn, top_up, charge.charge_id, conversion, "Top-up — auto", "line", 2_000
        )
    # Died here: the ledger has the credit, Redis does not yet.
    assert await _balance(app, "crash-3") == 4 * USD
    assert await app.topups.resolve_stale(0, RETRY_NOW) == 0  # nothing pending
    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 1
    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 0
    assert (await _charges(app, "crash-3"), await _balance(app, "crash-3")) == (1, 24 * USD)


async def test_after_a_complete_top_up_recovery_changes_nothing(app: App) -> None:
    await _with_auto_top_up(app, "crash-4")
    await app.gate.authorize("crash-4", rid(), 6 * USD, "")
    assert await _run_triggers(app) == 1
    assert await app.topups.resolve_stale(0, RETRY_NOW) == 0
    assert await app.accounts.sweep_unapplied_credits(older_than_s=0) == 0
    assert (await _charges(app, "crash-4"), await _balance(app, "crash-4")) == (1, 24 * USD)


async def test_target_mode_tops_up_to_the_target_balance_within_the_cap(app: App) -> None:
    await _with_auto_top_up(app, "target", balance=10 * USD, daily_cap=30 * USD)
    await app.topups.set_auto_top_up("target", True, 5 * USD, 20 * USD, 30 * USD, 0, 50 * USD)
    await app.gate.authorize("target", rid(), 7_250_000, "")  # $2.75 left
    assert await app.topups.auto("target", RETRY_NOW) == "succeeded"
    # $47.25 would reach the target; the $30 daily cap allows $30.00.
    [top_up] = await _top_ups(app, "target")
    assert top_up.amount_micros == 30 * USD
    assert await _balance(app, "target") == 32_750_000

    await app.topups.set_auto_top_up("target", True, 5 * USD, 20 * USD, 100 * USD, 0, 50 * USD)
    await app.gate.authorize("target", rid(), 30 * USD, "")  # $2.75 left again
    assert await app.topups.auto("target", RETRY_NOW) == "succeeded"
    assert await _balance(app, "target") == 50 * USD  # exactly the target: $47.25 charged


async def test_p15_monthly_report_sums_top_ups_invoices_and_usage(app: App) -> None:
    await _with_auto_top_up(app, "report")
    await app.gate.authorize("report", rid(), 6 * USD, "")
    assert await _run_triggers(app) == 1
    await app.topups.set_payment_methods("report", "pm_card_declined", "")
    await app.topups.manual("report", 5 * USD, rid())
    await app.flusher.drain()
    month = app.topups.clock().strftime("%Y-%m")
    report = await app.topups.monthly_report("report", month)
    assert (report.top_ups_succeeded, report.top_ups_failed) == (1, 1)
    assert (report.top_ups_micros, report.top_ups_credited_micros) == (20 * USD, 20 * USD)
    assert (report.invoices, report.invoiced_minor) == (1, 2_000)
    assert report.usage_micros == 6 * USD
    assert report.adjustments_micros == 10 * USD  # the test funding
    empty = await app.topups.monthly_report("report", "2020-01")
    assert (empty.top_ups_succeeded, empty.usage_micros, empty.invoices) == (0, 0, 0)


async def test_p7_auto_top_up_ignores_refusals_that_are_not_about_the_balance(app: App) -> None:
    """P7: a blocked account (KYC, abuse) is refused for its own reason; no top-up."""
    await _with_auto_top_up(app, "kyc", balance=6 * USD)
    await app.accounts.set_status("kyc", "disabled")
    denied = await app.gate.authorize("kyc", rid(), 2 * USD, "")
    assert (denied.allowed, denied.code) == (False, "account_disabled")
    assert await _run_triggers(app) == 0
    assert await _charges(app, "kyc") == 0


async def test_p16_auto_top_up_switched_off_never_charges(app: App) -> None:
    await _with_auto_top_up(app, "fixed-bill")
    await app.topups.set_auto_top_up("fixed-bill", False, 5 * USD, 20 * USD, 0, 0)
    await app.gate.authorize("fixed-bill", rid(), 9 * USD, "")
    denied = await app.gate.authorize("fixed-bill", rid(), 2 * USD, "")
    assert (denied.allowed, denied.code) == (False, "insufficient_balance")
    assert await _run_triggers(app) == 0
    assert await _charges(app, "fixed-bill") == 0


async def test_the_amount_must_exceed_the_threshold(app: App) -> None:
    await _with_auto_top_up(app, "tiny")
    with pytest.raises(InvalidArgument) as raised:
        await app.topups.set_auto_top_up("tiny", True, 50 * USD, 20 * USD, 100 * USD, 0)
    assert raised.value.field == "amount_micros"


async def test_p5_the_daily_cap_follows_the_accounts_own_day(app: App) -> None:
    await _with_auto_top_up(app, "auckland", daily_cap=20 * USD)
    await app.topups.set_time_zone("auckland", "Pacific/Auckland")  # UTC+13 in November
    evening_utc = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)  # 22:00 on the 23rd there
    app.topups.clock = lambda: evening_utc
    await app.gate.authorize("auckland", rid(), 6 * USD, "")
    assert await app.topups.auto("auckland", RETRY_NOW) == "succeeded"
    await app.gate.authorize("auckland", rid(), 20 * USD, "")
    assert await app.topups.auto("auckland", RETRY_NOW) == "daily_cap"
    # Two hours later it is the 24th in Auckland (still the 23rd in UTC): a new day.
    app.topups.clock = lambda: evening_utc + dt.timedelta(hours=2)
    assert await app.topups.auto("auckland", RETRY_NOW) == "succeeded"
    days = [t.local_day for t in await _top_ups(app, "auckland")]
    assert days == [dt.date(2026, 11, 23), dt.date(2026, 11, 24)]
    with pytest.raises(InvalidArgument) as raised:
        await app.topups.set_time_zone("auckland", "Mars/Olympus_Mons")
    assert raised.value.field == "time_zone"
