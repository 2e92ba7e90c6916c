"""Issue 13 item 7: a mistyped FX rate must not become a $108,420 charge (P6).

`SetFxRates EUR USD=10842` (meant: 1.0842) was stored as is, and a EUR 10 top-up
on a USD card was then charged and credited $108,420.00; auto top-ups would have
repeated it unattended. Now a rate more than BALANCE_GATE_FX_RATE_MAX_CHANGE_PCT
away from the last one for the pair is refused unless forced with a reason (the
API and `balance-gate fx load` alike), and one top-up may charge or credit at most
BALANCE_GATE_TOP_UP_MAX_CHARGE_MICROS (micro-USD): above it the top-up fails
before the payment gateway is called (its own records hold no charge).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from balance_gate.app import App
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, rid, with_settings

EUR = 1_000_000  # micro-EUR
TODAY = dt.datetime.now(dt.UTC).date()
YESTERDAY = TODAY - dt.timedelta(days=1)


async def _set_rates(
    running: RunningGate, day: dt.date, rates: dict[str, str], force_reason: str = ""
) -> None:
    request = admin_pb2.SetFxRatesRequest(date=day.isoformat(), base="EUR", rates=rates)
    if force_reason:
        request.force_reason = force_reason
    await running.admin.SetFxRates(request)


async def _eur_top_up_on_a_usd_card(running: RunningGate, account_id: str) -> admin_pb2.TopUpRecord:
    await running.admin.CreateAccount(
        admin_pb2.CreateAccountRequest(account_id=account_id, currency="EUR")
    )
    await running.admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id=account_id, primary="pm_card_visa")
    )
    top_up: admin_pb2.TopUpRecord = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id=account_id, amount_micros=10 * EUR, idempotency_key=rid())
    )
    return top_up


async def _gateway_charges(running: RunningGate, account_id: str) -> list[tuple[int, str]]:
    """What the sandbox gateway itself recorded for the account's top-ups."""
    rows = await running.app.pool.fetch(
        """SELECT s.amount_minor, s.currency FROM sandbox_charges s
           JOIN top_ups t ON s.idempotency_key = 'balance-gate-top-up-' || t.top_up_id
           WHERE t.account_id = $1 ORDER BY s.created_at""",
        account_id,
    )
    return [(r["amount_minor"], r["currency"]) for r in rows]


async def test_issue13_item7_a_mistyped_rate_is_refused_and_the_last_one_charges(
    running: RunningGate,
) -> None:
    """P6: 10842 after 1.0842 is refused naming rates[USD]; the top-up charges $10.85."""
    await _set_rates(running, YESTERDAY, {"USD": "1.0842"})
    try:
        await _set_rates(running, TODAY, {"USD": "10842"})
        refused = "stored"
    except grpc.aio.AioRpcError as exc:
        refused = f"{exc.code().name}: {exc.details()}"
    stored = await running.app.topups.rates.latest_rate("EUR", "USD")
    await _set_rates(running, TODAY, {"USD": "1.0850"})  # a day's move: accepted
    top_up = await _eur_top_up_on_a_usd_card(running, "typo")
    outcome = {
        "latest rate after the typo": stored,
        "charged": (top_up.charge_amount_minor, top_up.charge_currency),
        "credited": top_up.credited_micros,
        "gateway": await _gateway_charges(running, "typo"),
    }
    assert outcome == {
        "latest rate after the typo": Decimal("1.0842"),
        "charged": (1_085, "USD"),
        "credited": 10_850_000,
        "gateway": [(1_085, "USD")],
    }
    assert refused.startswith("FAILED_PRECONDITION: rates[USD]:"), refused
    assert "force_reason" in refused


async def test_issue13_item7_a_real_jump_is_stored_when_forced_with_a_reason(
    running: RunningGate,
) -> None:
    """A devaluation is real sometimes: force_reason stores it; an empty-looking reason
    is not a reason."""
    await _set_rates(running, YESTERDAY, {"USD": "1.0842"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _set_rates(running, TODAY, {"USD": "0.5"}, force_reason="   ")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("force_reason:")
    await _set_rates(running, TODAY, {"USD": "0.5"}, force_reason="EUR devalued, ECB notice 42")
    assert await running.app.topups.rates.rate(TODAY, "EUR", "USD") == Decimal("0.5")
    # The inverse pair is the same pair: 1 USD = 2 EUR is now the last known rate.
    assert await running.app.topups.rates.rate(TODAY, "USD", "EUR") == Decimal(2)


async def test_issue13_item7_one_top_up_cannot_charge_above_the_bound(
    running: RunningGate,
) -> None:
    """The first rate of a pair has nothing to compare with: the charge bound (default
    $10,000) stops the $108,420 charge before the gateway sees it."""
    await _set_rates(running, TODAY, {"USD": "10842"})  # first rate of the pair
    top_up = await _eur_top_up_on_a_usd_card(running, "bounded")
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="bounded"))
    outcome = {
        "status": admin_pb2.TopUpStatus.Name(top_up.status),
        "reason": top_up.decline_reason,
        "credited": top_up.credited_micros,
        "balance": account.balance_micros,
        "gateway": await _gateway_charges(running, "bounded"),
    }
    assert outcome == {
        "status": "TOP_UP_STATUS_FAILED",
        "reason": "charge_over_limit",
        "credited": 0,
        "balance": 0,
        "gateway": [],
    }


async def test_issue13_item7_an_auto_top_up_cannot_charge_above_the_bound(app: App) -> None:
    """Unattended: an EUR 20 auto top-up at the first rate 10842 charged $216,840. Now it
    fails (charge_over_limit, counted as a failure towards the P11 pause) with no charge
    at the gateway, and the next trigger waits for the retry interval."""
    await app.hot.ensure_top_up_groups()
    await app.topups.rates.set_rates(TODAY, "EUR", {"USD": Decimal(10842)})
    await app.accounts.create("auto-bounded", "EUR")
    await app.accounts.credit("auto-bounded", USD, "test funding", rid())
    await app.topups.set_payment_methods("auto-bounded", "pm_card_visa", "")
    await app.topups.set_auto_top_up("auto-bounded", True, 5 * EUR, 20 * EUR, 100 * EUR, 0)
    assert (await app.gate.authorize("auto-bounded", rid(), 100_000, "")).allowed
    while await app.top_up_worker.handle_new(None):
        pass
    [top_up] = await app.topups.list_top_ups("auto-bounded")
    settings = await app.topups.auto_top_up("auto-bounded")
    assert settings is not None
    charges = await app.pool.fetchval("SELECT count(*) FROM sandbox_charges")
    hot = await app.hot.read_account("auto-bounded")
    assert hot is not None
    assert {
        "top-up": (top_up.status, top_up.decline_reason, top_up.credited_micros),
        "failures": settings.consecutive_failures,
        "gateway charges": charges,
        "balance": hot.balance_micros,
    } == {
        "top-up": ("failed", "charge_over_limit", 0),
        "failures": 1,
        "gateway charges": 0,
        "balance": USD - 100_000,
    }


def _fx_load(database_url: str, csv_text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rates.csv"
        path.write_text(csv_text, encoding="utf-8")
        return subprocess.run(
            [sys.executable, "-m", "balance_gate", "fx", "load", str(path), *extra],
            env={**os.environ, "BALANCE_GATE_DATABASE_URL": database_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


async def test_issue13_item7_fx_load_applies_the_same_check(running: RunningGate) -> None:
    """A CSV with the typo stores nothing (one transaction) and says which line; with
    --force-reason it is stored."""
    await _set_rates(running, YESTERDAY, {"USD": "1.0842"})
    csv_text = f"date,base,quote,rate\n{TODAY},GBP,USD,1.27\n{TODAY},EUR,USD,10842\n"
    database_url = running.app.settings.database_url.get_secret_value()
    refused = await asyncio.to_thread(_fx_load, database_url, csv_text)
    rates = running.app.topups.rates
    after_refusal = (await rates.rate(TODAY, "EUR", "USD"), await rates.rate(TODAY, "GBP", "USD"))
    assert (refused.returncode, after_refusal) == (2, (None, None)), refused.stderr
    assert "line 3: rates[USD]" in refused.stderr
    forced = await asyncio.to_thread(
        _fx_load, database_url, csv_text, "--force-reason", "test of a forced load"
    )
    assert forced.returncode == 0, forced.stderr
    assert await rates.rate(TODAY, "EUR", "USD") == Decimal(10842)


async def test_issue13_item7_a_charge_the_gateway_already_holds_is_still_credited(
    settings: Settings,
) -> None:
    """The bound stops new charges only: a top-up whose charge reached the gateway before
    a crash (here: made beforehand under its key) is recorded and credited, even above
    the bound, never left charged and uncredited."""
    bounded = with_settings(settings, top_up_max_charge_micros=USD)
    async with App.opened(bounded, migrate=False) as app:
        await app.accounts.create("crashed", "USD")
        await app.topups.set_payment_methods("crashed", "pm_card_visa", "")
        next_id = 1 + await app.pool.fetchval("SELECT coalesce(max(top_up_id), 0) FROM top_ups")
        await app.topups.gateway.charge(
            "pm_card_visa", 500, "USD", f"balance-gate-top-up-{next_id}"
        )
        recorded = await app.topups.manual("crashed", 5 * USD, rid())
        refused = await app.topups.manual("crashed", 5 * USD, rid())
        charges = await app.pool.fetchval("SELECT count(*) FROM sandbox_charges")
        ledger = await app.pg.get_account("crashed")
    assert ledger is not None
    assert (recorded.top_up_id, recorded.status, recorded.credited_micros) == (
        next_id,
        "succeeded",
        5 * USD,
    )
    assert (refused.status, refused.decline_reason) == ("failed", "charge_over_limit")
    assert (charges, ledger.ledger_balance_micros) == (1, 5 * USD)
