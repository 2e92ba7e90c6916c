"""Daily FX rates and what a top-up in a non-USD currency converts to (P6).

Decimal arithmetic only. A rate is "1 unit of base = rate units of quote" for
one date; the inverse pair is used when only that one is known. Rounding, by
design and documented in README:
  - the USD credited is rounded half-even to the micro-dollar;
  - the amount charged is rounded half-up to the card currency's minor unit.
A missing rate is a clear failure of that top-up (fx_rate_missing), never a guess.
A new rate more than a set percentage away from the pair's last one is refused
unless forced with a reason (issue 13 item 7: 10842 typed for 1.0842).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

import asyncpg

from balance_gate import currencies, money, validation
from balance_gate.errors import FailedPrecondition, InvalidArgument
from balance_gate.postgres_store import Connection

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class _Row:
    """One rate to store; `field` names it in an error (with its CSV line)."""

    day: dt.date
    base: str
    quote: str
    rate: Decimal
    field: str


def is_plausible(rate: Decimal, last: Decimal, max_change_pct: int) -> bool:
    """Within a factor of (1 + pct/100) of `last`, up or down (exact, no division)."""
    factor_hundredths = 100 + max_change_pct
    return rate * 100 <= last * factor_hundredths and rate * factor_hundredths >= last * 100


class FxRates:
    def __init__(self, pool: asyncpg.Pool, max_change_pct: int) -> None:
        self._pool = pool
        self._max_change_pct = max_change_pct

    async def set_rates(
        self, day: dt.date, base: str, rates: dict[str, Decimal], force_reason: str = ""
    ) -> int:
        """Store one day's rates from `base` (replacing that day's earlier ones).

        A rate too far from the last one for its pair is refused (issue 13 item 7)
        unless `force_reason` says why it is right; nothing is stored then.
        """
        check_currency("base", base)
        for quote in rates:
            check_currency(f"rates[{quote}]", quote)
        rows = [_Row(day, base, quote, rate, f"rates[{quote}]") for quote, rate in rates.items()]
        await self._store(rows, force_reason)
        return len(rates)

    async def _store(self, rows: list[_Row], force_reason: str) -> None:
        if force_reason:
            validation.check_reason(force_reason, "force_reason")
        async with self._pool.acquire() as conn, conn.transaction():
            for row in rows:
                if row.quote != row.base:
                    await self._check_plausible(conn, row, force_reason)
                    await conn.execute(
                        """INSERT INTO fx_rates (rate_date, base, quote, rate)
                           VALUES ($1, $2, $3, $4)
                           ON CONFLICT (rate_date, base, quote) DO UPDATE SET rate = $4""",
                        row.day,
                        row.base,
                        row.quote,
                        row.rate,
                    )

    async def _check_plausible(self, conn: Connection, row: _Row, force_reason: str) -> None:
        last = await _last_rate(conn, row)
        if last is None or is_plausible(row.rate, last[1], self._max_change_pct):
            return
        last_day, last_rate = last
        if not force_reason:
            raise FailedPrecondition(
                f"{row.field}: {row.rate} is more than {self._max_change_pct}% away from the"
                f" last {row.base}/{row.quote} rate, {last_rate:f} ({last_day}); if it is"
                " right, send it again with force_reason"
            )
        log.warning(
            "FX rate %s/%s on %s forced to %s (last %s on %s): %s",
            row.base,
            row.quote,
            row.day,
            row.rate,
            last_rate,
            last_day,
            force_reason,
        )

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

    async def load_csv(self, path: Path, force_reason: str = "") -> int:
        """Load `date,base,quote,rate` rows (a header line first), all or nothing.

        Rows are stored by date, so each is checked against the day before it.
        """
        rows = []
        with path.open(newline="", encoding="utf-8") as handle:
            for line_number, line in enumerate(csv.DictReader(handle), start=2):
                where = f"line {line_number}"
                base, quote = line["base"].strip(), line["quote"].strip()
                check_currency(f"{where}: base", base)
                check_currency(f"{where}: rates[{quote}]", quote)
                rows.append(
                    _Row(
                        parse_date(f"{where}: date", line["date"]),
                        base,
                        quote,
                        parse_rate(f"{where}: rate", line["rate"].strip()),
                        f"{where}: rates[{quote}]",
                    )
                )
        await self._store(sorted(rows, key=lambda row: row.day), force_reason)
        return len(rows)


async def _last_rate(conn: Connection, row: _Row) -> tuple[dt.date, Decimal] | None:
    """The pair's rate nearest `row.day` (on or before it first), as 1 base in quote."""
    found = await conn.fetchrow(
        """SELECT rate_date, rate, base = $2 AS direct FROM fx_rates
           WHERE (base = $2 AND quote = $3) OR (base = $3 AND quote = $2)
           ORDER BY rate_date > $1, abs(rate_date - $1), base = $2 DESC LIMIT 1""",
        row.day,
        row.base,
        row.quote,
    )
    if found is None:
        return None
    rate: Decimal = found["rate"]
    return found["rate_date"], rate if found["direct"] else _ONE / rate
