"""Postgres, the system of record: accounts, credits, usage, and the shard locks.

Writers that change money in Postgres and then in Redis hold their shard's
advisory lock *shared* across both steps; loading or reconciling an account
holds it *exclusive*. So a load never reads a ledger that a half-finished
credit or flush has changed in one store and not yet in the other.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from balance_gate.constants import HOT_SHARD_LOCK_CLASS
from balance_gate.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from balance_gate.keys import credit_line_fields, shard_of


@dataclass(frozen=True, slots=True)
class AccountRow:
    account_id: str
    currency: str
    status: str
    credited_micros: int
    used_micros: int
    created_at: dt.datetime

    @property
    def ledger_balance_micros(self) -> int:
        return self.credited_micros - self.used_micros


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """What Redis needs to hold an account: its ledger balance and status."""

    status: str
    ledger_balance_micros: int
    # Credits committed but not yet known to be in Redis (see sync_account.lua).
    unapplied_credit_ids: list[int]
    # (armed, threshold): whether debits below the threshold raise a top-up trigger.
    auto_top_up: tuple[bool, int] = (False, 0)
    # The credit line (C1, C4) as the account hash holds it (credit_line_fields).
    line_fields: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class CreditRow:
    credit_id: int
    account_id: str
    amount_micros: int
    hot_applied: bool


@dataclass(frozen=True, slots=True)
class UsageEvent:
    account_id: str
    request_id: str
    kind: str  # 'authorize' | 'settle'
    amount_micros: int
    capability: str
    occurred_at: dt.datetime
    stream_entry_id: str
    # A settle's final cost (issue 13 item 2); None for an authorize, and for a
    # settle written by an earlier version (amount_micros is all it carries).
    final_micros: int | None = None


# A connection of the pool, or one opened directly (migrations, tests).
# The stubs make both generic; at run time they are plain classes.
if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection | PoolConnectionProxy


# A stream entry's identity: (shard, entry id). An id alone is unique in its own
# stream only; entries of one millisecond in two shards share it (issue 13 item 1).
EntryKey: TypeAlias = tuple[int, str]


def entry_key(event: UsageEvent) -> EntryKey:
    return shard_of(event.account_id), event.stream_entry_id


def _repriced(
    events: Sequence[UsageEvent], booked: Sequence[asyncpg.Record]
) -> dict[EntryKey, int]:
    """Entries booked at another amount than their own: entry amount - booked amount."""
    amounts = {(r["account_id"], r["stream_entry_id"]): r["amount_micros"] for r in booked}
    return {
        entry_key(e): e.amount_micros - amount
        for e in events
        if (amount := amounts[(e.account_id, e.stream_entry_id)]) != e.amount_micros
    }


@dataclass(frozen=True, slots=True)
class UsageRecorded:
    inserted: int
    # Stream entries that debited a request the ledger already had: Redis must
    # give those amounts back (see ack_usage.lua).
    duplicates: frozenset[EntryKey]
    # Entries the ledger booked at another amount than the entry's own (a settle
    # priced against the ledger's authorization, issue 13 item 2): the entry's
    # amount minus the booked one, which Redis gives back too.
    repriced: Mapping[EntryKey, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestBelowZero:
    """A request whose usage rows sum below 0 (the audit reports it)."""

    account_id: str
    request_id: str
    cost_micros: int


@dataclass(frozen=True, slots=True)
class UsedNotSummed:
    """An account whose used_micros differs from the sum of its usage rows."""

    account_id: str
    used_micros: int
    rows_micros: int


_ACCOUNT_COLUMNS = "account_id, currency, status, credited_micros, used_micros, created_at"


def _account(row: asyncpg.Record) -> AccountRow:
    return AccountRow(
        account_id=row["account_id"],
        currency=row["currency"],
        status=row["status"],
        credited_micros=row["credited_micros"],
        used_micros=row["used_micros"],
        created_at=row["created_at"],
    )


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def shard_lock(
        self, shards: Iterable[int], *, exclusive: bool
    ) -> AsyncIterator[Connection]:
        """Hold the hot-state locks of these shards on one connection.

        Shared holders take them in ascending order, so two of them never wait
        on each other through a queued exclusive request.
        """
        function = "pg_advisory_lock" if exclusive else "pg_advisory_lock_shared"
        async with self._pool.acquire() as conn:
            await conn.execute(
                f"SELECT {function}($1, s)"
                " FROM (SELECT DISTINCT unnest($2::int[]) AS s ORDER BY 1) ordered",
                HOT_SHARD_LOCK_CLASS,
                list(shards),
            )
            try:
                yield conn
            finally:
                # Releasing the connection resets it (asyncpg unlocks all advisory
                # locks then too); unlocking here frees the shards sooner.
                await conn.execute("SELECT pg_advisory_unlock_all()")

    # --- accounts ---------------------------------------------------------

    async def create_account(self, account_id: str, currency: str) -> AccountRow:
        row = await self._pool.fetchrow(
            f"""INSERT INTO accounts (account_id, currency) VALUES ($1, $2)
                ON CONFLICT (account_id) DO NOTHING RETURNING {_ACCOUNT_COLUMNS}""",
            account_id,
            currency,
        )
        if row is None:
            raise AlreadyExists(f"account {account_id!r} already exists")
        return _account(row)

    async def get_account(self, account_id: str) -> AccountRow | None:
        row = await self._pool.fetchrow(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1", account_id
        )
        return None if row is None else _account(row)

    async def account_exists(self, account_id: str) -> bool:
        """A plain primary-key read, without any shard lock (issue 12 item 5).

        Accounts are never deleted, so a "yes" stays true; a "no" may be
        overtaken by a CreateAccount, which the not-found cache's TTL bounds.
        """
        found: bool = await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = $1)", account_id
        )
        return found

    async def account_ids(self, after: str, limit: int) -> list[str]:
        rows = await self._pool.fetch(
            "SELECT account_id FROM accounts WHERE account_id > $1 ORDER BY account_id LIMIT $2",
            after,
            limit,
        )
        return [r["account_id"] for r in rows]

    async def load_snapshot(self, conn: Connection, account_id: str) -> LoadSnapshot | None:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(
                """SELECT a.status, a.credited_micros - a.used_micros AS balance,
                          coalesce(t.enabled AND NOT t.paused, false) AS armed,
                          coalesce(t.trigger_threshold_usd_micros, 0) AS threshold,
                          coalesce(l.limit_micros, 0) AS line_limit,
                          coalesce(l.stop_loss_share_pct, 100) AS line_share,
                          coalesce(l.high_cost_capabilities, '{}') AS line_caps,
                          coalesce(l.stop_loss_rate_per_s, 0) AS line_rate
                   FROM accounts a LEFT JOIN auto_top_up t USING (account_id)
                   LEFT JOIN credit_lines l USING (account_id)
                   WHERE a.account_id = $1""",
                account_id,
            )
            if row is None:
                return None
            unapplied = await conn.fetch(
                "SELECT credit_id FROM credits WHERE account_id = $1 AND NOT hot_applied",
                account_id,
            )
        return LoadSnapshot(
            row["status"],
            row["balance"],
            [r["credit_id"] for r in unapplied],
            (row["armed"], row["threshold"]),
            credit_line_fields(
                row["line_limit"], row["line_share"], row["line_caps"], row["line_rate"]
            ),
        )

    async def set_status(self, conn: Connection, account_id: str, status: str) -> AccountRow:
        row = await conn.fetchrow(
            f"""UPDATE accounts SET status = $2, updated_at = now() WHERE account_id = $1
                RETURNING {_ACCOUNT_COLUMNS}""",
            account_id,
            status,
        )
        if row is None:
            raise NotFound(f"account {account_id!r} not found")
        return _account(row)

    # --- credits ----------------------------------------------------------

    async def record_credit(
        self,
        conn: Connection,
        account_id: str,
        amount_micros: int,
        reason: str,
        idempotency_key: str,
        max_balance_micros: int,
        kind: str = "adjustment",
        *,
        hot_applied: bool = False,
    ) -> CreditRow:
        """Insert the credit and add it to the running total, once per key.

        A replay with the same key returns the stored credit; the same key with
        another amount or reason is refused rather than silently ignored.
        """
        async with conn.transaction():
            account = await conn.fetchrow(
                "SELECT credited_micros - used_micros AS balance FROM accounts"
                " WHERE account_id = $1 FOR UPDATE",
                account_id,
            )
            if account is None:
                raise NotFound(f"account {account_id!r} not found")
            existing = await conn.fetchrow(
                """SELECT credit_id, amount_micros, reason, hot_applied FROM credits
                   WHERE account_id = $1 AND idempotency_key = $2""",
                account_id,
                idempotency_key,
            )
            if existing is not None:
                if existing["amount_micros"] != amount_micros or existing["reason"] != reason:
                    raise FailedPrecondition(
                        f"idempotency_key {idempotency_key!r} was used with amount_micros="
                        f"{existing['amount_micros']} and another reason or amount"
                    )
                return CreditRow(
                    existing["credit_id"], account_id, amount_micros, existing["hot_applied"]
                )
            if abs(account["balance"] + amount_micros) > max_balance_micros:
                raise InvalidArgument(
                    "amount_micros", "would take the balance outside the supported range"
                )
            credit_id = await conn.fetchval(
                """INSERT INTO credits (account_id, amount_micros, kind, reason, idempotency_key,
                                        hot_applied)
                   VALUES ($1, $2, $5, $3, $4, $6) RETURNING credit_id""",
                account_id,
                amount_micros,
                reason,
                idempotency_key,
                kind,
                hot_applied,
            )
            await conn.execute(
                """UPDATE accounts SET credited_micros = credited_micros + $2, updated_at = now()
                   WHERE account_id = $1""",
                account_id,
                amount_micros,
            )
            await self._book_lots(conn, account_id, credit_id, kind, amount_micros)
        return CreditRow(credit_id, account_id, amount_micros, hot_applied=hot_applied)

    @staticmethod
    async def _book_lots(
        conn: Connection, account_id: str, credit_id: int, kind: str, amount_micros: int
    ) -> None:
        """A positive credit opens a lot; an operator's debit burns lots like usage.

        Refunds and expiries are negative credits too, but they book their own
        lot (its refunded or expired part), so they are not burnt here.
        """
        if kind in ("refund", "expiry"):
            return
        if amount_micros > 0:
            await conn.execute(
                "SELECT open_lot($1, $2, $3, $4)", account_id, credit_id, kind, amount_micros
            )
        elif kind == "adjustment":
            await conn.execute("SELECT burn_down($1, $2)", account_id, -amount_micros)

    async def set_credit_validity(self, account_id: str, days: int) -> bool:
        updated = await self._pool.execute(
            "UPDATE accounts SET credit_validity_days = $2, updated_at = now()"
            " WHERE account_id = $1",
            account_id,
            days,
        )
        return bool(updated == "UPDATE 1")

    @staticmethod
    async def next_invoice_number(conn: Connection) -> int:
        """The next number of the gapless sequence that invoices and credit notes share.

        Taken in the caller's transaction: a rollback gives the number back.
        """
        number: int = await conn.fetchval(
            "UPDATE invoice_counter SET last_number = last_number + 1 RETURNING last_number"
        )
        return number

    async def mark_credit_applied(self, conn: Connection, credit_id: int) -> None:
        await conn.execute("UPDATE credits SET hot_applied = true WHERE credit_id = $1", credit_id)

    async def unapplied_credits(self, older_than_s: float, limit: int) -> list[CreditRow]:
        rows = await self._pool.fetch(
            """SELECT credit_id, account_id, amount_micros FROM credits
               WHERE NOT hot_applied AND created_at < now() - make_interval(secs => $1)
               ORDER BY created_at LIMIT $2""",
            older_than_s,
            limit,
        )
        return [CreditRow(r["credit_id"], r["account_id"], r["amount_micros"], False) for r in rows]

    # --- usage ------------------------------------------------------------

    async def record_usage(self, conn: Connection, events: Sequence[UsageEvent]) -> UsageRecorded:
        """Insert usage events, skipping those already recorded (P2).

        The ledger keeps the first authorize and the first settle of a request
        id. A settle is booked against the authorization the ledger holds
        (issue 13 item 2): its final cost minus that authorization, whichever
        decision of Redis it settled (a request id decided again after its
        record expired is a duplicate, and its settle follows the first
        authorization). Authorizes go in first, so a settle finds the one of
        its own batch. The running totals grow by exactly the inserted rows, in
        the same transaction. Account rows are locked in a fixed order first,
        so two flushers with overlapping batches cannot deadlock.
        """
        if not events:
            return UsageRecorded(0, frozenset())
        async with conn.transaction():
            await conn.execute(
                "SELECT 1 FROM accounts WHERE account_id = ANY($1::text[])"
                " ORDER BY account_id FOR UPDATE",
                sorted({e.account_id for e in events}),
            )
            booked = await self._insert_authorizes(
                conn, [e for e in events if e.kind == "authorize"]
            )
            booked += await self._insert_settles(conn, [e for e in events if e.kind == "settle"])
            await self._add_to_used(conn, booked)
            if len(booked) == len(events):
                return UsageRecorded(len(booked), frozenset(), _repriced(events, booked))
            duplicates, repriced = await self._as_recorded(conn, events)
        return UsageRecorded(len(booked), duplicates, repriced)

    @staticmethod
    async def _insert_authorizes(
        conn: Connection, events: Sequence[UsageEvent]
    ) -> list[asyncpg.Record]:
        """The inserted rows: (account_id, stream_entry_id, amount_micros).

        An authorize whose request a settle already priced (recorded first: another
        flusher took the authorize over later) is booked at 0: the settle's
        amount is the request's whole final cost.
        """
        if not events:
            return []
        return await conn.fetch(
            """INSERT INTO usage_events (account_id, request_id, kind, amount_micros,
                                         capability, occurred_at, stream_entry_id)
               SELECT e.account_id, e.request_id, 'authorize',
                      CASE WHEN EXISTS (SELECT 1 FROM usage_events s
                                        WHERE s.account_id = e.account_id
                                          AND s.request_id = e.request_id
                                          AND s.kind = 'settle'
                                          AND s.final_micros IS NOT NULL)
                           THEN 0 ELSE e.amount_micros END,
                      e.capability, e.occurred_at, e.stream_entry_id
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[],
                           $5::timestamptz[], $6::text[])
                    AS e(account_id, request_id, amount_micros, capability, occurred_at,
                         stream_entry_id)
               ON CONFLICT DO NOTHING
               RETURNING account_id, stream_entry_id, amount_micros""",
            [e.account_id for e in events],
            [e.request_id for e in events],
            [e.amount_micros for e in events],
            [e.capability for e in events],
            [e.occurred_at for e in events],
            [e.stream_entry_id for e in events],
        )

    @staticmethod
    async def _insert_settles(
        conn: Connection, events: Sequence[UsageEvent]
    ) -> list[asyncpg.Record]:
        """The inserted rows: (account_id, stream_entry_id, amount_micros).

        Priced against the ledger's authorize row: final - authorized. Without
        one yet, the final cost itself (the authorize is booked at 0 when it
        comes). A settle of an earlier version (no final cost) keeps Redis's
        difference, but never takes its request below 0.
        """
        if not events:
            return []
        return await conn.fetch(
            """INSERT INTO usage_events (account_id, request_id, kind, amount_micros,
                                         capability, occurred_at, stream_entry_id,
                                         final_micros)
               SELECT e.account_id, e.request_id, 'settle',
                      CASE WHEN e.final_micros IS NOT NULL
                               THEN e.final_micros - coalesce(e.authorized, 0)
                           WHEN e.authorized IS NULL THEN e.delta
                           ELSE greatest(e.delta, -e.authorized) END,
                      e.capability, e.occurred_at, e.stream_entry_id, e.final_micros
               FROM (SELECT e.*,
                            (SELECT a.amount_micros FROM usage_events a
                             WHERE a.account_id = e.account_id
                               AND a.request_id = e.request_id
                               AND a.kind = 'authorize') AS authorized
                     FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                                 $5::text[], $6::timestamptz[], $7::text[])
                          AS e(account_id, request_id, delta, final_micros, capability,
                               occurred_at, stream_entry_id)) e
               ON CONFLICT DO NOTHING
               RETURNING account_id, stream_entry_id, amount_micros""",
            [e.account_id for e in events],
            [e.request_id for e in events],
            [e.amount_micros for e in events],
            [e.final_micros for e in events],
            [e.capability for e in events],
            [e.occurred_at for e in events],
            [e.stream_entry_id for e in events],
        )

    @staticmethod
    async def _add_to_used(conn: Connection, booked: Sequence[asyncpg.Record]) -> None:
        """Add the booked rows to the running totals; the lots pay for them (issue 5)."""
        used: dict[str, int] = defaultdict(int)
        for row in booked:
            used[row["account_id"]] += row["amount_micros"]
        if not used:
            return
        accounts = sorted(used)
        amounts = [used[account_id] for account_id in accounts]
        await conn.execute(
            """UPDATE accounts a SET used_micros = a.used_micros + t.used
               FROM unnest($1::text[], $2::bigint[]) AS t(account_id, used)
               WHERE a.account_id = t.account_id""",
            accounts,
            amounts,
        )
        await conn.execute(
            "SELECT burn_down(a, u) FROM unnest($1::text[], $2::bigint[]) AS t(a, u)",
            accounts,
            amounts,
        )

    @staticmethod
    async def _as_recorded(
        conn: Connection, events: Sequence[UsageEvent]
    ) -> tuple[frozenset[EntryKey], dict[EntryKey, int]]:
        """(duplicates, repriced) of a batch, from the rows the ledger holds for it.

        A duplicate: the ledger holds its (account, request, kind) from *another*
        stream entry, so Redis decided the request twice (it lost the request
        record: restart, flush, expiry) and this entry counts for nothing. The
        same entry seen again is a flusher retry: what it was booked at stands,
        and its difference to the entry is given back again (once: ack_usage
        touches the hot balance only for an entry still pending).
        """
        rows = await conn.fetch(
            """SELECT u.account_id, u.request_id, u.kind, u.stream_entry_id, u.amount_micros
               FROM usage_events u
               JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(account_id, request_id, kind)
                 USING (account_id, request_id, kind)""",
            [e.account_id for e in events],
            [e.request_id for e in events],
            [e.kind for e in events],
        )
        recorded = {
            (r["account_id"], r["request_id"], r["kind"]): (
                r["stream_entry_id"],
                r["amount_micros"],
            )
            for r in rows
        }
        duplicates: set[EntryKey] = set()
        repriced: dict[EntryKey, int] = {}
        for e in events:
            entry_id, booked = recorded[(e.account_id, e.request_id, e.kind)]
            if entry_id != e.stream_entry_id:
                duplicates.add(entry_key(e))
            elif booked != e.amount_micros:
                repriced[entry_key(e)] = e.amount_micros - booked
        return frozenset(duplicates), repriced

    async def set_aside_usage(
        self, conn: Connection, event: UsageEvent, sqlstate: str, reason: str
    ) -> bool:
        """Keep a usage event the ledger refused, with the reason (issue 13 item 3).

        False when this entry was set aside already (a retry after a crash).
        """
        status = await conn.execute(
            """INSERT INTO usage_dead_letters (account_id, request_id, kind, amount_micros,
                                               capability, occurred_at, shard,
                                               stream_entry_id, sqlstate, reason)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING""",
            event.account_id,
            event.request_id,
            event.kind,
            event.amount_micros,
            event.capability,
            event.occurred_at,
            shard_of(event.account_id),
            event.stream_entry_id,
            sqlstate,
            reason,
        )
        return bool(status == "INSERT 0 1")

    async def dead_letter_count(self) -> int:
        """Usage events set aside so far (the audit reports them)."""
        count: int = await self._pool.fetchval("SELECT count(*) FROM usage_dead_letters")
        return count

    async def requests_below_zero(self, account_ids: Sequence[str]) -> list[RequestBelowZero]:
        """Requests whose usage rows sum below 0: the ledger gave back more than
        it charged, so used went down without a credit (issue 13 item 2).

        Only a negative settle can do that, so only those are looked at, with
        their request's authorize. One statement: a consistent snapshot, no lock.
        """
        rows = await self._pool.fetch(
            """SELECT s.account_id, s.request_id,
                      s.amount_micros + coalesce(a.amount_micros, 0) AS cost
               FROM usage_events s
               LEFT JOIN usage_events a ON a.account_id = s.account_id
                                       AND a.request_id = s.request_id
                                       AND a.kind = 'authorize'
               WHERE s.account_id = ANY($1::text[]) AND s.kind = 'settle'
                 AND s.amount_micros + coalesce(a.amount_micros, 0) < 0
               ORDER BY s.account_id, s.request_id""",
            list(account_ids),
        )
        return [RequestBelowZero(r["account_id"], r["request_id"], r["cost"]) for r in rows]

    async def used_not_summed(self, account_ids: Sequence[str]) -> list[UsedNotSummed]:
        """Accounts whose running total used_micros is not the sum of their usage
        rows (both change in one transaction, so one statement sees them agree)."""
        rows = await self._pool.fetch(
            """SELECT account_id, used_micros, rows_micros FROM (
                   SELECT a.account_id, a.used_micros,
                          (SELECT coalesce(sum(u.amount_micros), 0)::bigint FROM usage_events u
                           WHERE u.account_id = a.account_id) AS rows_micros
                   FROM accounts a WHERE a.account_id = ANY($1::text[])) t
               WHERE used_micros <> rows_micros ORDER BY account_id""",
            list(account_ids),
        )
        return [UsedNotSummed(r["account_id"], r["used_micros"], r["rows_micros"]) for r in rows]

    async def lot_balance(self, account_id: str) -> int:
        """Unconsumed credit in the account's lots minus its unpaid usage.

        Equals the ledger balance (credited - used) at every commit: the lot
        invariant of issue 5, which the audit and the property test check.
        """
        total: int = await self._pool.fetchval(
            """SELECT coalesce((SELECT sum(amount_micros - consumed_micros - refunded_micros
                                           - expired_micros)
                                FROM credit_lots WHERE account_id = $1), 0)
                      - (SELECT unpaid_micros FROM accounts WHERE account_id = $1)""",
            account_id,
        )
        return total

    async def usage_total(self, account_id: str) -> int:
        """Sum of the usage rows (the audit's second opinion on used_micros)."""
        total: int = await self._pool.fetchval(
            "SELECT coalesce(sum(amount_micros), 0)::bigint FROM usage_events"
            " WHERE account_id = $1",
            account_id,
        )
        return total
