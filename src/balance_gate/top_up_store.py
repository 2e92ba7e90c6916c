"""Postgres records of top-ups: settings, charges, invoices (the ledger side of P3..P5)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from balance_gate.constants import MAX_SAFE_MICROS
from balance_gate.errors import FailedPrecondition, NotFound
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

    @property
    def gateway_key(self) -> str:
        """The idempotency key sent to the gateway: one per top-up, forever."""
        return f"balance-gate-top-up-{self.top_up_id}"


@dataclass(frozen=True, slots=True)
class InvoiceRow:
    invoice_number: int
    account_id: str
    top_up_id: int
    line: str
    amount_minor: int
    currency: str
    issued_at: dt.datetime


_TOP_UP_SELECT = """
    SELECT t.top_up_id, t.account_id, t.kind, t.idempotency_key, t.status, t.amount_micros,
           t.currency, t.credited_micros, t.payment_method, t.threshold_micros,
           t.decline_reason, t.created_at, i.invoice_number
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
                      last_stop_reason
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
    ) -> None:
        await conn.execute(
            """INSERT INTO auto_top_up (account_id, enabled, threshold_micros, amount_micros,
                                        daily_cap_micros, monthly_cap_micros)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (account_id) DO UPDATE SET
                   enabled = $2, threshold_micros = $3, amount_micros = $4,
                   daily_cap_micros = $5, monthly_cap_micros = $6, updated_at = now()""",
            account_id,
            enabled,
            threshold_micros,
            amount_micros,
            daily_cap_micros,
            monthly_cap_micros,
        )

    async def resume(self, conn: Connection, account_id: str) -> bool:
        done: str = await conn.execute(
            """UPDATE auto_top_up SET paused = false, consecutive_failures = 0,
                                      last_stop_reason = NULL, updated_at = now()
               WHERE account_id = $1""",
            account_id,
        )
        return done != "UPDATE 0"

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
        credited_micros: int,
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
                credited_micros,
                description,
                top_up.gateway_key,
                MAX_SAFE_MICROS,
                kind="top_up",
            )
            updated = await conn.execute(
                """UPDATE top_ups SET status = 'succeeded', credited_micros = $2,
                                      gateway_charge_id = $3, credit_id = $4,
                                      resolved_at = now()
                   WHERE top_up_id = $1 AND status = 'pending'""",
                top_up.top_up_id,
                credited_micros,
                charge_id,
                credit.credit_id,
            )
            if updated == "UPDATE 1":
                number = await conn.fetchval(
                    "UPDATE invoice_counter SET last_number = last_number + 1 RETURNING last_number"
                )
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

    async def list_invoices(self, account_id: str) -> list[InvoiceRow]:
        rows = await self._pool.fetch(
            """SELECT invoice_number, account_id, top_up_id, line, amount_minor, currency,
                      issued_at
               FROM invoices WHERE account_id = $1 ORDER BY invoice_number""",
            account_id,
        )
        return [InvoiceRow(**dict(r)) for r in rows]
