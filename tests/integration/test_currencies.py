"""P6: an EUR account topped up on a USD card and on an EUR card, right to the cent."""

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

from balance_gate.v1 import admin_pb2
from tests.conftest import RunningGate
from tests.helpers import rid

EUR = 1_000_000  # micro-EUR


async def _eur_account(running: RunningGate, account_id: str, card: str) -> None:
    await running.admin.CreateAccount(
        admin_pb2.CreateAccountRequest(account_id=account_id, currency="EUR")
    )
    await running.admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id=account_id, primary=card)
    )


async def _rates_today(running: RunningGate, rates: dict[str, str]) -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    await running.admin.SetFxRates(admin_pb2.SetFxRatesRequest(date=today, base="EUR", rates=rates))


async def _charged(running: RunningGate, top_up_id: int) -> tuple[int, str]:
    row = await running.app.pool.fetchrow(
        "SELECT amount_minor, currency FROM sandbox_charges WHERE idempotency_key = $1",
        f"balance-gate-top-up-{top_up_id}",
    )
    assert row is not None
    return row["amount_minor"], row["currency"]


async def test_p6_eur_account_with_a_usd_card_and_an_eur_card(running: RunningGate) -> None:
    await _rates_today(running, {"USD": "1.0842"})
    await _eur_account(running, "berlin", "pm_card_visa")
    on_usd_card = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="berlin", amount_micros=20 * EUR, idempotency_key=rid())
    )
    await running.admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id="berlin", primary="pm_card_eur")
    )
    on_eur_card = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="berlin", amount_micros=20 * EUR, idempotency_key=rid())
    )

    assert (on_usd_card.charge_currency, on_usd_card.charge_amount_minor) == ("USD", 2_168)
    assert await _charged(running, on_usd_card.top_up_id) == (2_168, "USD")
    assert (on_eur_card.charge_currency, on_eur_card.charge_amount_minor) == ("EUR", 2_000)
    assert await _charged(running, on_eur_card.top_up_id) == (2_000, "EUR")
    assert on_usd_card.credited_micros == on_eur_card.credited_micros == 21_684_000
    assert (on_usd_card.usd_rate, on_usd_card.card_rate) == ("1.0842", "1.0842")
    assert (on_eur_card.usd_rate, on_eur_card.card_rate) == ("1.0842", "1")
    assert on_usd_card.local_day == dt.datetime.now(dt.UTC).date().isoformat()

    invoices = (
        await running.admin.ListInvoices(admin_pb2.ListInvoicesRequest(account_id="berlin"))
    ).invoices
    assert [(i.amount_minor, i.currency) for i in invoices] == [(2_000, "EUR"), (2_000, "EUR")]
    assert invoices[0].line.split() == ["Top-up", "—", "manual", "€20.00"]
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="berlin"))
    assert account.balance_micros == 2 * 21_684_000  # the balance is USD (P1)


async def test_p6_a_missing_rate_fails_the_top_up_and_charges_nothing(
    running: RunningGate,
) -> None:
    await _eur_account(running, "norate", "pm_card_visa")
    answer = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="norate", amount_micros=5 * EUR, idempotency_key=rid())
    )
    assert (answer.status, answer.decline_reason) == (
        admin_pb2.TOP_UP_STATUS_FAILED,
        "fx_rate_missing",
    )
    count = await running.app.pool.fetchval("SELECT count(*) FROM sandbox_charges")
    assert count == 0


async def test_fx_rates_reject_floats_in_disguise_and_unknown_currencies(
    running: RunningGate,
) -> None:
    for rates, field in (({"USD": "abc"}, "rates[USD]"), ({"USD": "-1"}, "rates[USD]"),
                         ({"XYZ": "1.1"}, "rates[XYZ]")):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _rates_today(running, rates)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (raised.value.details() or "").startswith(f"{field}:")


def _fx_load(csv_text: str, database_url: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rates.csv"
        path.write_text(csv_text, encoding="utf-8")
        return subprocess.run(
            [sys.executable, "-m", "balance_gate", "fx", "load", str(path)],
            env={**os.environ, "BALANCE_GATE_DATABASE_URL": database_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


async def test_fx_load_command_reads_a_csv(running: RunningGate) -> None:
    csv_text = "date,base,quote,rate\n2026-11-20,EUR,USD,1.0842\n2026-11-20,GBP,USD,1.27\n"
    database_url = running.app.settings.database_url.get_secret_value()
    done = await asyncio.to_thread(_fx_load, csv_text, database_url)
    assert done.returncode == 0, done.stderr
    assert "stored 2 rates" in done.stdout
    rate = await running.app.topups.rates.rate(dt.date(2026, 11, 20), "USD", "GBP")
    assert rate is not None
    assert round(rate, 6) == round(1 / Decimal("1.27"), 6)
