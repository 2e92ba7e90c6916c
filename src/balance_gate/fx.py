"""Daily FX rates and what a top-up in a non-USD currency converts to (P6).

Decimal arithmetic only. A rate is "1 unit of base = rate units of quote" for
one date; the inverse pair is used when only that one is known. Rounding, by
design and documented in README:
  - the USD credited is rounded half-even to the micro-dollar;
  - the amount charged is rounded half-up to the card currency's minor unit.
A missing rate is a clear failure of that top-up (fx_rate_missing), never a guess.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

import asyncpg

from balance_gate import currencies, money
from balance_gate.errors import InvalidArgument

_ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Conversion:
    """A top-up of amount_micros in its default currency, charged on a card."""

    credited_usd_micros: int
    charge_currency: str
    charge_amount_minor: int
    usd_rate: Decimal  # 1 default-currency unit in USD
    card_rate: Decimal  # 1 default-currency unit in the card's currency


def convert(
    amount_micros: int, currency: str, card_currency: str, usd_rate: Decimal, card_rate: Decimal
) -> Conversion:
    credited = (
        amount_micros if currency == "USD" else _round(amount_micros * usd_rate, ROUND_HALF_EVEN)
    )
    if card_currency == currency:
        charge_minor = money.to_minor(amount_micros, currency)
    else:
        card_micros = amount_micros * card_rate
        charge_minor = _round(card_micros / money.micros_per_minor(card_currency), ROUND_HALF_UP)
    return Conversion(credited, card_currency, charge_minor, usd_rate, card_rate)


def _round(value: Decimal, rounding: str) -> int:
    return int(value.quantize(_ONE, rounding=rounding))


def parse_rate(field: str, text: str) -> Decimal:
    try:
        rate = Decimal(text)
    except InvalidOperation:
        raise InvalidArgument(field, f"{text!r} is not a decimal number") from None
    if not rate.is_finite() or rate <= 0:
        raise InvalidArgument(field, "must be a positive decimal number")
    return rate


def parse_date(field: str, text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(field, f"{text!r} is not a YYYY-MM-DD date") from None


def check_currency(field: str, code: str) -> None:
    if not currencies.is_known(code):
        raise InvalidArgument(field, f"{code!r} is not a supported ISO 4217 currency code")


class FxRates:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def set_rates(self, day: dt.date, base: str, rates: dict[str, Decimal]) -> int:
        """Store one day's rates from `base` (replacing that day's earlier ones)."""
        check_currency("base", base)
        for quote in rates:
            check_currency(f"rates[{quote}]", quote)
        await self._pool.executemany(
            """INSERT INTO fx_rates (rate_date, base, quote, rate) VALUES ($1, $2, $3, $4)
               ON CONFLICT (rate_date, base, quote) DO UPDATE SET rate = $4""",
            [(day, base, quote, rate) for quote, rate in rates.items() if quote != base],
        )
        return len(rates)

    async def rate(self, day: dt.date, base: str, quote: str) -> Decimal | None:
        """Units of `quote` for one `base` on `day`, or None when unknown."""
        if base == quote:
            return _ONE
        row = await self._pool.fetchrow(
            """SELECT rate, base = $2 AS direct FROM fx_rates
               WHERE rate_date = $1 AND ((base = $2 AND quote = $3) OR (base = $3 AND quote = $2))
               ORDER BY (base = $2) DESC LIMIT 1""",
            day,
            base,
            quote,
        )
        if row is None:
            return None
        rate: Decimal = row["rate"]
        return rate if row["direct"] else _ONE / rate

    async def latest_rate(self, base: str, quote: str) -> Decimal | None:
        """The most recent known rate (for arming the Redis threshold only)."""
        if base == quote:
            return _ONE
        day = await self._pool.fetchval(
            """SELECT max(rate_date) FROM fx_rates
               WHERE (base = $1 AND quote = $2) OR (base = $2 AND quote = $1)""",
            base,
            quote,
        )
        return None if day is None else await self.rate(day, base, quote)

    async def load_csv(self, path: Path) -> int:
        """Load `date,base,quote,rate` rows (a header line first)."""
        by_day: dict[tuple[dt.date, str], dict[str, Decimal]] = {}
        with path.open(newline="", encoding="utf-8") as handle:
            for line_number, row in enumerate(csv.DictReader(handle), start=2):
                where = f"line {line_number}"
                day = parse_date(f"{where}: date", row["date"])
                rates = by_day.setdefault((day, row["base"].strip()), {})
                rates[row["quote"].strip()] = parse_rate(f"{where}: rate", row["rate"].strip())
        return sum(
            [await self.set_rates(day, base, rates) for (day, base), rates in by_day.items()]
        )
