"""Issue 13 item 6: the daily and monthly caps (P5, O1) hold across time-zone changes.

A zone change must not open a new day (or month) beside the one whose cap was
just used: for a while after the change the caps also count a rolling window
(24 h, 31 days), so no real 24 h period containing a charge made after the
change holds more than the daily cap. Charges are judged by the sandbox
gateway's own records, not by balance-gate's rows.
"""

from __future__ import annotations

import datetime as dt

from balance_gate.app import App
from tests.helpers import USD, fund, rid

RETRY_NOW = 0.0
CAPPED_CHARGE = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


async def _gateway_charges(app: App, account_id: str) -> int:
    """What the sandbox gateway itself charged for this account's top-ups."""
    count: int = await app.pool.fetchval(
        """SELECT count(*) FROM sandbox_charges s JOIN top_ups t
             ON s.idempotency_key = 'balance-gate-top-up-' || t.top_up_id
           WHERE t.account_id = $1""",
        account_id,
    )
    return count


async def _gateway_charged_cents(app: App, account_id: str) -> int:
    total: int = await app.pool.fetchval(
        """SELECT coalesce(sum(s.amount_minor), 0) FROM sandbox_charges s JOIN top_ups t
             ON s.idempotency_key = 'balance-gate-top-up-' || t.top_up_id
           WHERE t.account_id = $1 AND s.succeeded""",
        account_id,
    )
    return total


async def _capped_account(
    app: App, account_id: str, *, daily_cap: int, monthly_cap: int = 0
) -> None:
    """$10 balance, $10 top-ups under a $5 threshold, in UTC."""
    await app.hot.ensure_top_up_groups()
    await fund(app, account_id, 10 * USD)
    await app.topups.set_payment_methods(account_id, "pm_card_visa", "")
    await app.topups.set_auto_top_up(account_id, True, 5 * USD, 10 * USD, daily_cap, monthly_cap)


async def _dip_and_trigger(app: App, account_id: str, at: dt.datetime) -> str:
    """Spend the balance under the threshold at `at` and run the auto top-up."""
    app.topups.clock = lambda: at
    hot = await app.hot.read_account(account_id)
    assert hot is not None
    spend = hot.balance_micros - 4 * USD
    if spend > 0:
        assert (await app.gate.authorize(account_id, rid(), spend, "")).allowed
    return await app.topups.auto(account_id, RETRY_NOW)


async def _charge_then_move(app: App, account_id: str, at: dt.datetime, zone: str) -> None:
    assert await _dip_and_trigger(app, account_id, at) == "succeeded"
    app.topups.clock = lambda: at + dt.timedelta(seconds=4)
    await app.topups.set_time_zone(account_id, zone)


async def test_issue_13_item_6_p5_zone_moved_east_does_not_open_a_second_day(app: App) -> None:
    await _capped_account(app, "east", daily_cap=10 * USD)
    await _charge_then_move(app, "east", CAPPED_CHARGE, "Pacific/Kiritimati")  # UTC+14
    # 8 s later it is already the 30th in Kiritimati.
    after = CAPPED_CHARGE + dt.timedelta(seconds=8)
    assert await _dip_and_trigger(app, "east", after) == "daily_cap"
    # The next Kiritimati day starts 22 h after the charge: still inside its 24 h.
    next_local_day = dt.datetime(2026, 11, 30, 10, 0, 1, tzinfo=dt.UTC)
    assert await _dip_and_trigger(app, "east", next_local_day) == "daily_cap"
    assert await _gateway_charges(app, "east") == 1
    # A full day after the charge, the cap has room again.
    a_day_later = CAPPED_CHARGE + dt.timedelta(hours=24, seconds=1)
    assert await _dip_and_trigger(app, "east", a_day_later) == "succeeded"
    assert await _gateway_charges(app, "east") == 2


async def test_issue_13_item_6_p5_no_24_h_spanning_a_zone_change_holds_more_than_the_cap(
    app: App,
) -> None:
    """Cap $20 = two $10 top-ups: one before the move east, one late on the new
    zone's day, and the new zone's next midnight (22 h after the first) must not
    bring a third: all three would lie within one real 24 h."""
    await _capped_account(app, "window", daily_cap=20 * USD)
    await _charge_then_move(app, "window", CAPPED_CHARGE, "Pacific/Kiritimati")
    late_30th_there = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)  # 23:00 on the 30th
    assert await _dip_and_trigger(app, "window", late_30th_there) == "succeeded"
    first_of_december_there = dt.datetime(2026, 11, 30, 10, 0, 1, tzinfo=dt.UTC)
    assert await _dip_and_trigger(app, "window", first_of_december_there) == "daily_cap"
    assert await _gateway_charged_cents(app, "window") == 2000


async def test_issue_13_item_6_p5_a_change_dated_by_a_clock_slightly_ahead_still_counts(
    app: App,
) -> None:
    """Sidecars' clocks differ: the change may be dated after the next plan's 'now'."""
    await _capped_account(app, "skew", daily_cap=10 * USD)
    assert await _dip_and_trigger(app, "skew", CAPPED_CHARGE) == "succeeded"
    app.topups.clock = lambda: CAPPED_CHARGE + dt.timedelta(seconds=30)
    await app.topups.set_time_zone("skew", "Pacific/Kiritimati")
    after = CAPPED_CHARGE + dt.timedelta(seconds=8)
    assert await _dip_and_trigger(app, "skew", after) == "daily_cap"
    assert await _gateway_charges(app, "skew") == 1


async def test_issue_13_item_6_p5_zone_moved_west_does_not_reopen_yesterday(app: App) -> None:
    await _capped_account(app, "west", daily_cap=10 * USD)
    early = dt.datetime(2026, 11, 29, 1, 0, tzinfo=dt.UTC)  # the 28th in Pago Pago (UTC-11)
    await _charge_then_move(app, "west", early, "Pacific/Pago_Pago")
    assert await _dip_and_trigger(app, "west", early + dt.timedelta(seconds=8)) == "daily_cap"
    assert await _gateway_charges(app, "west") == 1
    # The 30th in Pago Pago, 34 h after the charge: a new day with room.
    later = dt.datetime(2026, 11, 30, 11, 0, 1, tzinfo=dt.UTC)
    assert await _dip_and_trigger(app, "west", later) == "succeeded"
    assert await _gateway_charges(app, "west") == 2


async def test_issue_13_item_6_p5_far_west_the_same_dip_is_refused(app: App) -> None:
    await _capped_account(app, "dateline", daily_cap=10 * USD)
    early = dt.datetime(2026, 11, 29, 2, 0, tzinfo=dt.UTC)  # the 28th at UTC-12
    await _charge_then_move(app, "dateline", early, "Etc/GMT+12")
    assert await _dip_and_trigger(app, "dateline", early + dt.timedelta(seconds=8)) == "daily_cap"
    assert await _gateway_charges(app, "dateline") == 1


async def test_issue_13_item_6_o1_zone_moved_east_does_not_open_a_second_month(app: App) -> None:
    await _capped_account(app, "month-east", daily_cap=100 * USD, monthly_cap=10 * USD)
    last_day = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)  # 1 December in Kiritimati
    await _charge_then_move(app, "month-east", last_day, "Pacific/Kiritimati")
    after = last_day + dt.timedelta(seconds=8)
    assert await _dip_and_trigger(app, "month-east", after) == "monthly_cap"
    # January there, but within 31 days of the charge: the month's window still holds.
    january_there = dt.datetime(2026, 12, 31, 10, 0, 1, tzinfo=dt.UTC)
    assert await _dip_and_trigger(app, "month-east", january_there) == "monthly_cap"
    assert await _gateway_charges(app, "month-east") == 1
    past_the_window = last_day + dt.timedelta(days=31, seconds=1)
    assert await _dip_and_trigger(app, "month-east", past_the_window) == "succeeded"
    assert await _gateway_charges(app, "month-east") == 2


async def test_issue_13_item_6_p5_a_zone_set_before_any_charge_keeps_calendar_days(
    app: App,
) -> None:
    """The rolling window lasts 24 h after a change only: a zone set days before
    the charges leaves the usual calendar day (P5 'until the next day')."""
    await _capped_account(app, "settled", daily_cap=10 * USD)
    app.topups.clock = lambda: CAPPED_CHARGE - dt.timedelta(days=3)
    await app.topups.set_time_zone("settled", "Pacific/Kiritimati")
    assert await _dip_and_trigger(app, "settled", CAPPED_CHARGE) == "succeeded"  # the 30th
    next_day = dt.datetime(2026, 11, 30, 10, 0, 1, tzinfo=dt.UTC)  # 1 Dec there
    assert await _dip_and_trigger(app, "settled", next_day) == "succeeded"
    assert await _gateway_charges(app, "settled") == 2
