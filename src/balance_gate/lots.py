"""Credit lots off the hot path: where a lot stands in the burn order, and expiry (O2).

Both refunds and expiry take a lot's money out of the hot balance with
lua/lot_take.lua while holding the shard's exclusive lock, so that the usage
Redis decided but Postgres has not burnt yet is exactly `unflushed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from balance_gate import validation
from balance_gate.accounts import Accounts
from balance_gate.constants import MAX_SAFE_MICROS, ScriptCode
from balance_gate.keys import shard_of
from balance_gate.postgres_store import Connection, CreditRow, PostgresStore
from balance_gate.redis_store import RedisStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LotPosition:
    lot_id: int
    account_id: str
    open_micros: int  # amount - consumed - refunded - expired
    open_before_micros: int  # open parts of the lots burnt before this one
    expired: bool  # past its expiry (the expiry job may not have run yet)
    expired_micros: int


async def lot_position(
    conn: Connection, *, credit_id: int | None = None, lot_id: int | None = None
) -> LotPosition | None:
    """Lock one lot (FOR UPDATE) and say where it stands in its account's burn order."""
    lot = await conn.fetchrow(
        """SELECT lot_id, account_id, expires_at, expires_at <= now() AS expired, expired_micros,
                  amount_micros - consumed_micros - refunded_micros - expired_micros AS open
           FROM credit_lots WHERE credit_id = $1 OR lot_id = $2 FOR UPDATE""",
        credit_id,
        lot_id,
    )
    if lot is None:
        return None
    before: int = await conn.fetchval(
        """SELECT coalesce(sum(amount_micros - consumed_micros - refunded_micros
                               - expired_micros), 0)::bigint
           FROM credit_lots
           WHERE account_id = $1 AND lot_id <> $2
             AND consumed_micros + refunded_micros + expired_micros < amount_micros
             AND (CASE WHEN $3::timestamptz IS NULL
                       THEN expires_at IS NOT NULL OR lot_id < $2
                       ELSE expires_at < $3 OR (expires_at = $3 AND lot_id < $2) END)""",
        lot["account_id"],
        lot["lot_id"],
        lot["expires_at"],
    )
    return LotPosition(
        lot["lot_id"],
        lot["account_id"],
        int(lot["open"]),
        before,
        bool(lot["expired"]),
        int(lot["expired_micros"]),
    )


_TAKEN_PART = {"refund": "refunded_micros", "expiry": "expired_micros"}


async def book_take(
    pg: PostgresStore,
    conn: Connection,
    lot: LotPosition,
    kind: str,
    taken_micros: int,
    reason: str,
    idempotency_key: str,
) -> CreditRow:
    """Book what lua/lot_take.lua took out of the balance, in the caller's transaction.

    A credit of `kind` ("refund" or "expiry") for minus the amount, already in
    Redis, and the lot's refunded or expired part grows by it.
    """
    credit = await pg.record_credit(
        conn,
        lot.account_id,
        -taken_micros,
        reason,
        idempotency_key,
        MAX_SAFE_MICROS,
        kind=kind,
        hot_applied=True,  # lot_take.lua already took it out of Redis
    )
    part = _TAKEN_PART[kind]
    await conn.execute(
        f"UPDATE credit_lots SET {part} = {part} + $2 WHERE lot_id = $1", lot.lot_id, taken_micros
    )
    return credit


class LotExpiry:
    """Takes expired, unconsumed credit out of the balance (O2), safe on every sidecar."""

    def __init__(
        self, pool: asyncpg.Pool, pg: PostgresStore, hot: RedisStore, accounts: Accounts
    ) -> None:
        self._pool = pool
        self._pg = pg
        self._hot = hot
        self._accounts = accounts

    async def expire_due(self, limit: int = 500) -> int:
        """Expire up to `limit` due lots; the micros taken out of balances."""
        due = await self._pool.fetch(
            """SELECT lot_id, account_id FROM credit_lots
               WHERE expires_at <= now()
                 AND consumed_micros + refunded_micros + expired_micros < amount_micros
               ORDER BY expires_at LIMIT $1""",
            limit,
        )
        taken = 0
        for row in due:
            taken += await self._expire(row["lot_id"], row["account_id"])
        return taken

    async def _expire(self, lot_id: int, account_id: str) -> int:
        if not await self._accounts.ensure_loaded(account_id):
            return 0
        async with (
            self._pg.shard_lock([shard_of(account_id)], exclusive=True) as conn,
            conn.transaction(),
        ):
            lot = await lot_position(conn, lot_id=lot_id)
            if lot is None or not lot.expired or lot.open_micros <= 0:
                return 0  # another sidecar was first, or usage burnt it meanwhile
            # Named by what was expired so far: a rerun after a crash takes once.
            marker = f"expiry:{lot_id}:{lot.expired_micros}"
            result = await self._hot.lot_take(
                account_id, marker, lot.open_micros, lot.open_micros, lot.open_before_micros
            )
            if result.code == ScriptCode.NOT_LOADED or result.value == 0:
                return 0  # what is open is still being burnt by unflushed usage
            await book_take(
                self._pg,
                conn,
                lot,
                "expiry",
                result.value,
                f"credit lot {lot_id} expired",
                validation.system_key(marker),
            )
        log.info("expired %d micros of lot %d (%s)", result.value, lot_id, account_id)
        return result.value
