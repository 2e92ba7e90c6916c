"""P15: the monthly report gains the lots, refunds, credit notes and credit used."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import subprocess
import sys

from balance_gate.app import App
from balance_gate.settings import Settings
from tests.helpers import USD, rid, sidecar_env


async def _a_month_of_lots(app: App, account_id: str) -> str:
    """A $5 top-up, $2 used, $1 refunded; a $1 credit that expires. Returns YYYY-MM."""
    await app.accounts.create(account_id, "USD")
    await app.topups.set_payment_methods(account_id, "pm_card_visa", "")
    top_up = await app.topups.manual(account_id, 5 * USD, rid())
    assert (await app.gate.authorize(account_id, rid(), 2 * USD, "")).allowed
    await app.flusher.drain()
    await app.refunds.refund_top_up(top_up.top_up_id, 1 * USD, "partial refund", rid())
    await app.accounts.credit(account_id, 1 * USD, "promo", rid())
    await app.pool.execute(
        """UPDATE credit_lots SET expires_at = now() - interval '1 second'
           WHERE account_id = $1 AND source = 'adjustment'""",
        account_id,
    )
    assert await app.expiry.expire_due() == 1 * USD
    return dt.datetime.now(dt.UTC).strftime("%Y-%m")


async def test_p15_monthly_report_has_lots_refunds_and_credit_notes(app: App) -> None:
    month = await _a_month_of_lots(app, "p15")
    report = await app.topups.monthly_report("p15", month)
    assert (report.lots_opened, report.lots_opened_micros) == (2, 6 * USD)
    assert report.lots_consumed_micros == 2 * USD
    assert report.lots_refunded_micros == 1 * USD
    assert report.lots_expired_micros == 1 * USD
    assert report.refunds_micros == 1 * USD
    assert (report.credit_notes, report.credit_noted_minor) == (1, -100)
    assert report.credit_used_micros == 0
    assert report.usage_micros == 2 * USD


async def test_p15_report_command_writes_every_account_as_csv(app: App, settings: Settings) -> None:
    month = await _a_month_of_lots(app, "p15-csv")
    await app.accounts.create("p15-quiet", "USD")
    env = sidecar_env(settings)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "balance_gate", "report", "--month", month, "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    out = done.stdout
    rows = {row["account_id"]: row for row in csv.DictReader(io.StringIO(out))}
    assert set(rows) == {"p15-csv", "p15-quiet"}
    assert rows["p15-csv"]["lots_consumed_micros"] == str(2 * USD)
    assert rows["p15-csv"]["lots_expired_micros"] == str(1 * USD)
    assert rows["p15-quiet"]["lots_opened"] == "0"
