"""Abuse appeals (P14): a customer who believes auto top-ups came from abuse
(leaked credentials, a runaway crawler) appeals within 7 days of them.

Filing records the succeeded auto top-ups of the 7 days before it; with none,
the appeal is refused. A confirmed appeal refunds all the unconsumed credit of
each of them (P13: consumed credit is never refunded) and pauses auto top-up
until it is re-enabled by hand. Appeals and decisions keep their timestamps.
Resolving a confirmed appeal again finishes refunds the gateway left pending.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from balance_gate import validation
from balance_gate.errors import AlreadyExists, FailedPrecondition, NotFound
from balance_gate.refunds import Refunds
from balance_gate.topups import TopUps

APPEAL_WINDOW = dt.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Appeal:
    appeal_id: int
    account_id: str
    description: str
    filed_at: dt.datetime
    status: str  # open | confirmed | rejected
    decided_at: dt.datetime | None
    top_up_ids: tuple[int, ...]
    refunded_micros: int


class Appeals:
    def __init__(self, pool: asyncpg.Pool, refunds: Refunds, topups: TopUps) -> None:
        self._pool = pool
        self._refunds = refunds
        self._topups = topups

    async def file(self, account_id: str, description: str) -> Appeal:
        validation.check_id("account_id", account_id)
        validation.check_reason(description, field="description")
        async with self._pool.acquire() as conn, conn.transaction():
            if (
                await conn.fetchval("SELECT 1 FROM accounts WHERE account_id = $1", account_id)
                is None
            ):
                raise NotFound(f"account {account_id!r} not found")
            top_ups = await conn.fetch(
                """SELECT top_up_id FROM top_ups
                   WHERE account_id = $1 AND kind = 'auto' AND status = 'succeeded'
                     AND created_at >= now() - $2::interval
                   ORDER BY top_up_id""",
                account_id,
                APPEAL_WINDOW,
            )
            if not top_ups:
                raise FailedPrecondition(
                    f"P14: account {account_id!r} had no auto top-up in the last 7 days"
                )
            try:
                appeal_id = await conn.fetchval(
                    """INSERT INTO abuse_appeals (account_id, description) VALUES ($1, $2)
                       RETURNING appeal_id""",
                    account_id,
                    description,
                )
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(
                    f"account {account_id!r} already has an open abuse appeal"
                ) from None
            await conn.executemany(
                "INSERT INTO abuse_appeal_top_ups (appeal_id, top_up_id) VALUES ($1, $2)",
                [(appeal_id, row["top_up_id"]) for row in top_ups],
            )
        return await self.get(appeal_id)

    async def resolve(self, appeal_id: int, confirmed: bool) -> Appeal:
        appeal = await self.get(appeal_id)
        decision = "confirmed" if confirmed else "rejected"
        if appeal.status not in ("open", decision):
            raise FailedPrecondition(f"appeal {appeal_id} was already {appeal.status}")
        if appeal.status == "open":
            await self._pool.execute(
                """UPDATE abuse_appeals SET status = $2, decided_at = now()
                   WHERE appeal_id = $1 AND status = 'open'""",
                appeal_id,
                decision,
            )
        if confirmed:
            await self._topups.pause(appeal.account_id, "abuse_appeal")
            for top_up_id in appeal.top_up_ids:
                refund = await self._refunds.refund_for_appeal(appeal_id, top_up_id)
                await self._pool.execute(
                    """UPDATE abuse_appeal_top_ups SET refund_id = $3
                       WHERE appeal_id = $1 AND top_up_id = $2""",
                    appeal_id,
                    top_up_id,
                    refund.refund_id,
                )
        return await self.get(appeal_id)

    async def get(self, appeal_id: int) -> Appeal:
        row = await self._pool.fetchrow(
            """SELECT a.appeal_id, a.account_id, a.description, a.filed_at, a.status,
                      a.decided_at,
                      array_agg(t.top_up_id ORDER BY t.top_up_id) AS top_up_ids,
                      coalesce(sum(r.refunded_micros), 0)::bigint AS refunded_micros
               FROM abuse_appeals a
               JOIN abuse_appeal_top_ups t USING (appeal_id)
               LEFT JOIN refunds r ON r.refund_id = t.refund_id
               WHERE a.appeal_id = $1
               GROUP BY a.appeal_id""",
            appeal_id,
        )
        if row is None:
            raise NotFound(f"appeal {appeal_id} not found")
        return Appeal(
            row["appeal_id"],
            row["account_id"],
            row["description"],
            row["filed_at"],
            row["status"],
            row["decided_at"],
            tuple(row["top_up_ids"]),
            row["refunded_micros"],
        )
