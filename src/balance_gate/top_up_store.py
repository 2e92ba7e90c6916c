"""Postgres records of top-ups: settings, charges, invoices (the ledger side of P3..P5)."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg

from balance_gate import emails, money, validation
from balance_gate.constants import MAX_SAFE_MICROS
from balance_gate.errors import FailedPrecondition, NotFound
from balance_gate.fx import Conversion
from balance_gate.postgres_store import Connection, CreditRow, PostgresStore


@dataclass(frozen=True, slots=True)
class Billing:
    """What charging an account needs to know about it."""

    currency: str
    time_zone: str
    primary_payment_method: str | None
    backup_payment_method: str | None


@dataclass(frozen=True, slots=True)
class AutoTopUpRow:
    enabled: bool
    threshold_micros: int
    amount_micros: int
    daily_cap_micros: int
    monthly_cap_micros: int | None
    paused: bool
    consecutive_failures: int
    last_decline_reason: str | None
    last_stop_reason: str | None
    trigger_threshold_usd_micros: int
    target_balance_micros: int | None


@dataclass(frozen=True, slots=True)
class TopUpRow:
    top_up_id: int
    account_id: str
    kind: str  # 'auto' | 'manual'
    idempotency_key: str
    status: str  # 'pending' | 'succeeded' | 'failed'
    amount_micros: int
    currency: str
    credited_micros: int
    payment_method: str
    threshold_micros: int | None
    decline_reason: str | None
    created_at: dt.datetime
    invoice_number: int | None
    local_day: dt.date
    charge_currency: str | None
    charge_amount_minor: int | None
    usd_rate: Decimal | None
    card_rate: Decimal | None

    @property
    def gateway_key(self) -> str:
        """The idempotency key sent to the gateway: one per top-up, forever."""
        return validation.system_key(f"top-up-{self.top_up_id}")


@dataclass(frozen=True, slots=True)
class AutoPlan:
    """The outcome of one trigger: a pending top-up to charge, or why not."""

    top_up: TopUpRow | None
    stop_reason: str | None


@dataclass(frozen=True, slots=True)
class Charged:
    """Auto top-up charges of the account's current day and month (non-failed)."""

    today_micros: int
    month_micros: int
    pending_micros: int


# Consecutive failures before the backup card is tried (P12) and before a
# card is given up on (P11).
FAILURES_PER_CARD = 3

# After a time-zone change the caps also count rolling windows this long, for
# as long: a real day, and the longest month (issue 13 item 6).
CAP_DAY_WINDOW = dt.timedelta(hours=24)
CAP_MONTH_WINDOW = dt.timedelta(days=31)
# Sidecars' clocks differ a little: a change dated this far ahead of `now` counts.
CAP_CLOCK_SKEW = dt.timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class MonthlyReport:
    month: dt.date
    currency: str
    top_ups_succeeded: int
    top_ups_failed: int
    top_ups_micros: int
    top_ups_credited_micros: int
    invoices: int
    invoiced_minor: int
    usage_micros: int
    adjustments_micros: int
    refunds_micros: int  # refunded to cards (net of refunds the gateway refused)
    credit_notes: int
    credit_noted_minor: int  # sum of the credit notes: negative
    lots_opened: int
    lots_opened_micros: int
    lots_consumed_micros: int
    lots_refunded_micros: int
    lots_expired_micros: int
    credit_used_micros: int  # usage no lot covers, when the report is made


@dataclass(frozen=True, slots=True)
class InvoiceRow:
    invoice_number: int
    account_id: str
    top_up_id: int
    line: str
    amount_minor: int
    currency: str
    issued_at: dt.datetime


def _card_for(row: asyncpg.Record) -> str | None:
    """The primary card until it failed 3 times in a row, then the backup (P12)."""
    if row["consecutive_failures"] < FAILURES_PER_CARD:
        method: str | None = row["primary_payment_method"]
        return method
    backup: str | None = row["backup_payment_method"]
    return backup


_TOP_UP_SELECT = """
    SELECT t.top_up_id, t.account_id, t.kind, t.idempotency_key, t.status, t.amount_micros,
           t.currency, t.credited_micros, t.payment_method, t.threshold_micros,
           t.decline_reason, t.created_at, i.invoice_number, t.local_day, t.charge_currency,
           t.charge_amount_minor, t.usd_rate, t.card_rate
    FROM top_ups t LEFT JOIN invoices i USING (top_up_id)"""


def _top_up(row: asyncpg.Record) -> TopUpRow:
    return TopUpRow(**dict(row))


class TopUpStore:
    def __init__(self, pool: asyncpg.Pool, pg: PostgresStore) -> None:
        self._pool = pool
        self._pg = pg

    async def billing(self, account_id: str) -> Billing:
        row = await self._pool.fetchrow(
            """SELECT currency, time_zone, primary_payment_method, backup_payment_method
               FROM accounts WHERE account_id = $1""",
            account_id,
        )
        if row is None:
            raise NotFound(f"account {account_id!r} not found")
        return Billing(**dict(row))

    async def set_time_zone(self, account_id: str, time_zone: str, now: dt.datetime) -> None:
        """Set the zone; a different zone also dates the change (the caps' windows)."""
        done = await self._pool.execute(
            """UPDATE accounts
               SET time_zone_changed_at = CASE WHEN time_zone = $2 THEN time_zone_changed_at
                                               ELSE $3 END,
                   time_zone = $2, updated_at = now()
               WHERE account_id = $1""",
            account_id,
            time_zone,
            now,
        )
        if done == "UPDATE 0":
            raise NotFound(f"account {account_id!r} not found")

    async def set_billing_email(self, account_id: str, email: str) -> None:
        done = await self._pool.execute(
            "UPDATE accounts SET billing_email = $2, updated_at = now() WHERE account_id = $1",
            account_id,
            email,
        )
        if done == "UPDATE 0":
            raise NotFound(f"account {account_id!r} not found")

    async def set_payment_methods(self, account_id: str, primary: str, backup: str | None) -> None:
        done = await self._pool.execute(
            """UPDATE accounts SET primary_payment_method = $2, backup_payment_method = $3,
                                   updated_at = now()
               WHERE account_id = $1""",
            account_id,
            primary,
            backup,
        )
        if done == "UPDATE 0":
            raise NotFound(f"account {account_id!r} not found")

    async def auto_top_up(self, account_id: str) -> AutoTopUpRow | None:
        row = await self._pool.fetchrow(
            """SELECT enabled, threshold_micros, amount_micros, daily_cap_micros,
                      monthly_cap_micros, paused, consecutive_failures, last_decline_reason,
                      last_stop_reason, trigger_threshold_usd_micros, target_balance_micros
               FROM auto_top_up WHERE account_id = $1""",
            account_id,
        )
        return None if row is None else AutoTopUpRow(**dict(row))

    async def save_auto_top_up(
        self,
        conn: Connection,
        account_id: str,
        enabled: bool,
        threshold_micros: int,
        amount_micros: int,
        daily_cap_micros: int,
        monthly_cap_micros: int | None,
        trigger_threshold_usd_micros: int,
        target_balance_micros: int | None = None,
    ) -> None:
        await conn.execute(
            """INSERT INTO auto_top_up (account_id, enabled, threshold_micros, amount_micros,
                                        daily_cap_micros, monthly_cap_micros,
                                        trigger_threshold_usd_micros, target_balance_micros)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (account_id) DO UPDATE SET
                   enabled = $2, threshold_micros = $3, amount_micros = $4,
                   daily_cap_micros = $5, monthly_cap_micros = $6,
                   trigger_threshold_usd_micros = $7, target_balance_micros = $8,
                   updated_at = now()""",
            account_id,
            enabled,
            threshold_micros,
            amount_micros,
            daily_cap_micros,
            monthly_cap_micros,
            trigger_threshold_usd_micros,
            target_balance_micros,
        )

    async def record_stop(self, account_id: str, reason: str) -> None:
        await self._pool.execute(
            "UPDATE auto_top_up SET last_stop_reason = $2 WHERE account_id = $1", account_id, reason
        )

    async def pause(self, conn: Connection, account_id: str, reason: str) -> bool:
        done: str = await conn.execute(
            """UPDATE auto_top_up SET paused = true, last_stop_reason = $2, updated_at = now()
               WHERE account_id = $1""",
            account_id,
            reason,
        )
        return done != "UPDATE 0"

    async def resume(self, conn: Connection, account_id: str) -> bool:
        done: str = await conn.execute(
            """UPDATE auto_top_up SET paused = false, consecutive_failures = 0,
                                      last_stop_reason = NULL, updated_at = now()
               WHERE account_id = $1""",
            account_id,
        )
        return done != "UPDATE 0"

    async def charged(
        self, conn: Connection | None, account_id: str, today: dt.date, now: dt.datetime
    ) -> Charged:
        """Sum the day's and the month's auto top-ups (P5, O1).

        Within CAP_DAY_WINDOW of a time-zone change the day also counts every
        charge of the last CAP_DAY_WINDOW, and within CAP_MONTH_WINDOW the month
        every charge of the last CAP_MONTH_WINDOW: a zone change cannot open a
        new day or month beside the one whose cap was just used.
        """
        sql = """WITH since AS (
                   SELECT CASE WHEN time_zone_changed_at BETWEEN $5 AND $4 THEN $5 END AS day,
                          CASE WHEN time_zone_changed_at BETWEEN $6 AND $4 THEN $6 END AS month
                   FROM accounts WHERE account_id = $1)
                 SELECT
                   coalesce(sum(amount_micros) FILTER (WHERE kind = 'auto'
                            AND (local_day = $2 OR planned_at > since.day)), 0)::bigint,
                   coalesce(sum(amount_micros) FILTER (WHERE kind = 'auto'
                            AND (local_day >= $3 OR planned_at > since.month)), 0)::bigint,
                   coalesce(sum(amount_micros) FILTER (WHERE status = 'pending'), 0)::bigint
                 FROM top_ups LEFT JOIN since ON true
                 WHERE account_id = $1 AND status <> 'failed'
                   AND (local_day >= $3 OR status = 'pending' OR planned_at > since.month)"""
        day_since, month_since = now - CAP_DAY_WINDOW, now - CAP_MONTH_WINDOW
        latest_change = now + CAP_CLOCK_SKEW
        args = (account_id, today, today.replace(day=1), latest_change, day_since, month_since)
        row = await (conn.fetchrow(sql, *args) if conn else self._pool.fetchrow(sql, *args))
        assert row is not None
        return Charged(row[0], row[1], row[2])

    async def plan_auto(self, account_id: str, balance_micros: int, now: dt.datetime) -> AutoPlan:
        """Decide one trigger in one transaction (the settings row locked), P5/O1.

        Skips when pending top-ups already lift the balance over the threshold;
        otherwise charges the smallest whole number of top-up amounts that
        lifts it over, cut down to what the daily and monthly caps allow.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT a.currency, a.time_zone, a.primary_payment_method,
                          a.backup_payment_method, t.enabled, t.paused, t.threshold_micros,
                          t.amount_micros, t.daily_cap_micros, t.monthly_cap_micros,
                          t.consecutive_failures, t.target_balance_micros
                   FROM accounts a JOIN auto_top_up t USING (account_id)
                   WHERE a.account_id = $1 FOR UPDATE OF t""",
                account_id,
            )
            if row is None or not row["enabled"]:
                return AutoPlan(None, "disabled")
            reason, top_up = await self._plan_locked(conn, account_id, balance_micros, now, row)
            await conn.execute(
                "UPDATE auto_top_up SET last_stop_reason = $2 WHERE account_id = $1",
                account_id,
                reason,
            )
            return AutoPlan(top_up, reason)

    async def _plan_locked(
        self,
        conn: Connection,
        account_id: str,
        balance_micros: int,
        now: dt.datetime,
        row: asyncpg.Record,
    ) -> tuple[str | None, TopUpRow | None]:
        if row["paused"]:
            return "paused", None
        method = _card_for(row)
        if method is None:
            return "no_payment_method", None
        today = now.astimezone(ZoneInfo(row["time_zone"])).date()
        charged = await self.charged(conn, account_id, today, now)
        threshold, amount = row["threshold_micros"], row["amount_micros"]
        covered = balance_micros + charged.pending_micros
        if covered > threshold:
            return ("pending_covers" if charged.pending_micros else "above_threshold"), None
        day_room = row["daily_cap_micros"] - charged.today_micros
        month_room = (row["monthly_cap_micros"] or MAX_SAFE_MICROS) - charged.month_micros
        step = money.micros_per_minor(row["currency"])
        if row["target_balance_micros"] is not None:
            # Top up to the target, in whole minor units, within both caps.
            wanted = -(-(row["target_balance_micros"] - covered) // step) * step
            charge = min(wanted, day_room // step * step, month_room // step * step)
        else:
            # The fewest whole amounts that lift the balance over the threshold.
            count = (threshold - covered) // amount + 1
            charge = min(count, day_room // amount, month_room // amount) * amount
        if charge <= 0:
            return ("daily_cap" if day_room <= month_room else "monthly_cap"), None
        top_up_id = await conn.fetchval(
            """INSERT INTO top_ups (account_id, kind, idempotency_key, status, amount_micros,
                                    currency, payment_method, threshold_micros, local_day,
                                    planned_at)
               VALUES ($1, 'auto', $2, 'pending', $3, $4, $5, $6, $7, $8) RETURNING top_up_id""",
            account_id,
            validation.system_key(f"auto-{uuid.uuid4().hex}"),
            charge,
            row["currency"],
            method,
            threshold,
            today,
            now,
        )
        stored = await conn.fetchrow(_TOP_UP_SELECT + " WHERE t.top_up_id = $1", top_up_id)
        assert stored is not None
        return None, _top_up(stored)

    async def record_auto_outcome(self, account_id: str, decline_reason: str | None) -> bool:
        """Count consecutive failures (P11/P12) and queue the customer's email (P8) in
        the same transaction; True when auto top-up is now paused."""
        async with self._pool.acquire() as conn, conn.transaction():
            if decline_reason is None:
                await conn.execute(
                    """UPDATE auto_top_up SET consecutive_failures = 0, updated_at = now()
                       WHERE account_id = $1""",
                    account_id,
                )
                return False
            row = await conn.fetchrow(
                """UPDATE auto_top_up t
                   SET consecutive_failures = consecutive_failures + 1,
                       last_decline_reason = $2, updated_at = now()
                   FROM accounts a WHERE t.account_id = $1 AND a.account_id = $1
                   RETURNING t.consecutive_failures, a.backup_payment_method""",
                account_id,
                decline_reason,
            )
            if row is None:
                return False
            cards = 2 if row["backup_payment_method"] else 1
            paused: bool = row["consecutive_failures"] >= cards * FAILURES_PER_CARD
            if paused:
                await conn.execute(
                    """UPDATE auto_top_up SET paused = true, last_stop_reason = 'paused'
                       WHERE account_id = $1""",
                    account_id,
                )
            subject, body = emails.top_up_failed(account_id, decline_reason, paused)
            kind = "auto_top_up_paused" if paused else "top_up_failed"
            await emails.queue_email(conn, account_id, kind, subject, body)
            return paused

    async def stale_pending(self, older_than_s: float, limit: int = 100) -> list[TopUpRow]:
        rows = await self._pool.fetch(
            _TOP_UP_SELECT
            + """ WHERE t.status = 'pending' AND t.created_at < now() - make_interval(secs => $1)
                  ORDER BY t.top_up_id LIMIT $2""",
            older_than_s,
            limit,
        )
        return [_top_up(r) for r in rows]

    async def create_top_up(
        self,
        account_id: str,
        kind: str,
        idempotency_key: str,
        amount_micros: int,
        currency: str,
        payment_method: str,
        threshold_micros: int | None,
        local_day: dt.date,
    ) -> TopUpRow:
        """Insert a pending top-up once per key; a replay returns the stored one."""
        top_up_id = await self._pool.fetchval(
            """INSERT INTO top_ups (account_id, kind, idempotency_key, status, amount_micros,
                                    currency, payment_method, threshold_micros, local_day)
               VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8)
               ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING top_up_id""",
            account_id,
            kind,
            idempotency_key,
            amount_micros,
            currency,
            payment_method,
            threshold_micros,
            local_day,
        )
        if top_up_id is None:
            stored = await self._by_key(account_id, idempotency_key)
            if stored.amount_micros != amount_micros or stored.kind != kind:
                raise FailedPrecondition(
                    f"idempotency_key {idempotency_key!r} was used for another top-up"
                    f" ({stored.kind}, amount_micros={stored.amount_micros})"
                )
            return stored
        return await self.get(top_up_id)

    async def _by_key(self, account_id: str, idempotency_key: str) -> TopUpRow:
        row = await self._pool.fetchrow(
            _TOP_UP_SELECT + " WHERE t.account_id = $1 AND t.idempotency_key = $2",
            account_id,
            idempotency_key,
        )
        assert row is not None
        return _top_up(row)

    async def get(self, top_up_id: int) -> TopUpRow:
        row = await self._pool.fetchrow(_TOP_UP_SELECT + " WHERE t.top_up_id = $1", top_up_id)
        if row is None:
            raise NotFound(f"top-up {top_up_id} not found")
        return _top_up(row)

    async def succeed(
        self,
        conn: Connection,
        top_up: TopUpRow,
        charge_id: str,
        conversion: Conversion,
        description: str,
        line: str,
        amount_minor: int,
    ) -> CreditRow:
        """Record a successful charge: the credit, the one-line invoice, the status.

        One transaction: a top-up is never marked paid without its credit and
        invoice, and the credit's key (the top-up's) makes a retry harmless.
        """
        async with conn.transaction():
            credit = await self._pg.record_credit(
                conn,
                top_up.account_id,
                conversion.credited_usd_micros,
                description,
                top_up.gateway_key,
                MAX_SAFE_MICROS,
                kind="top_up",
            )
            updated = await conn.execute(
                """UPDATE top_ups SET status = 'succeeded', credited_micros = $2,
                                      gateway_charge_id = $3, credit_id = $4,
                                      charge_currency = $5, charge_amount_minor = $6,
                                      usd_rate = $7, card_rate = $8, resolved_at = now()
                   WHERE top_up_id = $1 AND status = 'pending'""",
                top_up.top_up_id,
                conversion.credited_usd_micros,
                charge_id,
                credit.credit_id,
                conversion.charge_currency,
                conversion.charge_amount_minor,
                conversion.usd_rate,
                conversion.card_rate,
            )
            if updated == "UPDATE 1":
                number = await self._pg.next_invoice_number(conn)
                await conn.execute(
                    """INSERT INTO invoices (invoice_number, account_id, top_up_id, line,
                                             amount_minor, currency)
                       VALUES ($1, $2, $3, $4, $5, $6)""",
                    number,
                    top_up.account_id,
                    top_up.top_up_id,
                    line,
                    amount_minor,
                    top_up.currency,
                )
        return credit

    async def fail(self, top_up_id: int, decline_reason: str) -> None:
        await self._pool.execute(
            """UPDATE top_ups SET status = 'failed', decline_reason = $2, resolved_at = now()
               WHERE top_up_id = $1 AND status = 'pending'""",
            top_up_id,
            decline_reason,
        )

    async def list_top_ups(self, account_id: str) -> list[TopUpRow]:
        rows = await self._pool.fetch(
            _TOP_UP_SELECT + " WHERE t.account_id = $1 ORDER BY t.top_up_id", account_id
        )
        return [_top_up(r) for r in rows]

    async def monthly_report(
        self, account_id: str, first_day: dt.date, billing: Billing
    ) -> MonthlyReport:
        """Sums of one month in the account's time zone (days for top-ups, instants for
        usage, invoices and adjustments)."""
        next_first = (first_day + dt.timedelta(days=32)).replace(day=1)
        row = await self._pool.fetchrow(
            """WITH bounds AS (
                   SELECT ($2::date::timestamp AT TIME ZONE $4) AS since,
                          ($3::date::timestamp AT TIME ZONE $4) AS until)
               SELECT
                 (SELECT count(*) FILTER (WHERE status = 'succeeded') FROM top_ups
                   WHERE account_id = $1 AND local_day >= $2 AND local_day < $3)::int,
                 (SELECT count(*) FILTER (WHERE status = 'failed') FROM top_ups
                   WHERE account_id = $1 AND local_day >= $2 AND local_day < $3)::int,
                 (SELECT coalesce(sum(amount_micros), 0) FROM top_ups WHERE status = 'succeeded'
                   AND account_id = $1 AND local_day >= $2 AND local_day < $3)::bigint,
                 (SELECT coalesce(sum(credited_micros), 0) FROM top_ups WHERE status = 'succeeded'
                   AND account_id = $1 AND local_day >= $2 AND local_day < $3)::bigint,
                 (SELECT count(*) FROM invoices, bounds WHERE account_id = $1
                   AND issued_at >= since AND issued_at < until)::int,
                 (SELECT coalesce(sum(amount_minor), 0) FROM invoices, bounds WHERE account_id = $1
                   AND issued_at >= since AND issued_at < until)::bigint,
                 (SELECT coalesce(sum(amount_micros), 0) FROM usage_events, bounds
                   WHERE account_id = $1 AND occurred_at >= since AND occurred_at < until)::bigint,
                 (SELECT coalesce(sum(amount_micros), 0) FROM credits, bounds
                   WHERE account_id = $1 AND kind = 'adjustment'
                     AND created_at >= since AND created_at < until)::bigint,
                 (SELECT coalesce(-sum(amount_micros), 0) FROM credits, bounds
                   WHERE account_id = $1 AND kind = 'refund'
                     AND created_at >= since AND created_at < until)::bigint,
                 (SELECT count(*) FROM credit_notes, bounds WHERE account_id = $1
                   AND issued_at >= since AND issued_at < until)::int,
                 (SELECT coalesce(sum(amount_minor), 0) FROM credit_notes, bounds
                   WHERE account_id = $1 AND issued_at >= since AND issued_at < until)::bigint,
                 (SELECT count(*) FROM credit_lots, bounds WHERE account_id = $1
                   AND purchased_at >= since AND purchased_at < until)::int,
                 (SELECT coalesce(sum(amount_micros), 0) FROM credit_lots, bounds
                   WHERE account_id = $1
                     AND purchased_at >= since AND purchased_at < until)::bigint,
                 (SELECT coalesce(sum(amount_micros) FILTER (WHERE kind = 'consumed'), 0)
                   FROM lot_movements, bounds WHERE account_id = $1
                   AND at >= since AND at < until)::bigint,
                 (SELECT coalesce(sum(amount_micros) FILTER (WHERE kind = 'refunded'), 0)
                   FROM lot_movements, bounds WHERE account_id = $1
                   AND at >= since AND at < until)::bigint,
                 (SELECT coalesce(sum(amount_micros) FILTER (WHERE kind = 'expired'), 0)
                   FROM lot_movements, bounds WHERE account_id = $1
                   AND at >= since AND at < until)::bigint,
                 (SELECT unpaid_micros FROM accounts WHERE account_id = $1)""",
            account_id,
            first_day,
            next_first,
            billing.time_zone,
        )
        assert row is not None
        return MonthlyReport(first_day, billing.currency, *row)

    async def list_invoices(self, account_id: str) -> list[InvoiceRow]:
        rows = await self._pool.fetch(
            """SELECT invoice_number, account_id, top_up_id, line, amount_minor, currency,
                      issued_at
               FROM invoices WHERE account_id = $1 ORDER BY invoice_number""",
            account_id,
        )
        return [InvoiceRow(**dict(r)) for r in rows]
