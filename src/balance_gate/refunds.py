"""Refunds of the unconsumed part of a top-up (P13), with a credit note each.

One refund, by its idempotency key:
1. `taking`: the row exists. Under the shard's exclusive lock (no flush half
   done), lua/lot_take.lua takes at most what the top-up's lot will still
   hold once the usage Redis already decided is burnt, out of the hot balance,
   atomically, once (a marker keeps the amount). In the same Postgres
   transaction the lot's refunded part, a `refund` credit (already applied)
   and the row (`pending`) are written.
2. `pending`: the payment gateway refunds the charge, pro rata in the charged
   currency, under the key `balance-gate-refund-<id>`; then `succeeded` with a
   credit note (a negative invoice). A refusal gives the money back to the
   balance and the lot (`failed`). An unknown outcome stays `pending`: the
   same call again finishes it.
A crash between the Redis take and the Postgres commit leaves `taking` and the
marker: the same call again books what the marker says, never takes twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from balance_gate import money, validation
from balance_gate.accounts import Accounts
from balance_gate.constants import MAX_SAFE_MICROS, ScriptCode
from balance_gate.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from balance_gate.keys import shard_of
from balance_gate.lots import LotPosition, book_take, lot_position
from balance_gate.payments import GatewayRejected, GatewayUnavailable, PaymentGateway
from balance_gate.postgres_store import Connection, PostgresStore
from balance_gate.redis_store import RedisStore


@dataclass(frozen=True, slots=True)
class RefundRow:
    refund_id: int
    account_id: str
    top_up_id: int
    requested_micros: int  # 0: all that is unconsumed
    refunded_micros: int
    status: str  # taking | pending | succeeded | failed
    refund_currency: str | None
    refund_minor: int | None
    failure_reason: str | None
    credit_note_number: int | None

    @property
    def partial(self) -> bool:
        """Less than asked for: traffic had consumed the rest."""
        return 0 < self.requested_micros != self.refunded_micros


@dataclass(frozen=True, slots=True)
class _TopUp:
    top_up_id: int
    account_id: str
    status: str
    credited_micros: int
    charge_currency: str | None
    charge_amount_minor: int | None
    gateway_charge_id: str | None
    credit_id: int | None


class Refunds:
    def __init__(
        self,
        pool: asyncpg.Pool,
        pg: PostgresStore,
        hot: RedisStore,
        accounts: Accounts,
        gateway: PaymentGateway,
    ) -> None:
        self._pool = pool
        self._pg = pg
        self._hot = hot
        self._accounts = accounts
        self._gateway = gateway

    async def refund_top_up(
        self, top_up_id: int, amount_micros: int, reason: str, idempotency_key: str
    ) -> RefundRow:
        """An operator's refund, under the operator's key (never a system key)."""
        validation.check_client_key("idempotency_key", idempotency_key)
        return await self._refund(top_up_id, amount_micros, reason, idempotency_key)

    async def refund_for_appeal(self, appeal_id: int, top_up_id: int) -> RefundRow:
        """All that is unconsumed, keyed by appeal and top-up: resolving again never
        refunds twice."""
        key = validation.system_key(f"appeal-{appeal_id}-top-up-{top_up_id}")
        return await self._refund(top_up_id, 0, f"abuse appeal {appeal_id} confirmed (P14)", key)

    async def _refund(
        self, top_up_id: int, amount_micros: int, reason: str, idempotency_key: str
    ) -> RefundRow:
        if amount_micros < 0:
            raise InvalidArgument("amount_micros", "must not be negative (0: all unconsumed)")
        validation.check_reason(reason)
        top_up = await self._top_up(top_up_id)
        if top_up.status != "succeeded" or top_up.credit_id is None:
            raise FailedPrecondition(f"top-up {top_up_id} did not succeed: nothing to refund")
        # Shielded: a caller that hangs up must not stop a refund between stores.
        return await asyncio.shield(self._run(top_up, amount_micros, reason, idempotency_key))

    async def _run(
        self, top_up: _TopUp, amount_micros: int, reason: str, idempotency_key: str
    ) -> RefundRow:
        row = await self._begin(top_up, amount_micros, reason, idempotency_key)
        if row.status == "taking":
            row = await self._take(top_up, row, reason)
        if row.status == "pending":
            row = await self._pay(top_up, row)
        return row

    async def _top_up(self, top_up_id: int) -> _TopUp:
        row = await self._pool.fetchrow(
            """SELECT top_up_id, account_id, status, credited_micros, charge_currency,
                      charge_amount_minor, gateway_charge_id, credit_id
               FROM top_ups WHERE top_up_id = $1""",
            top_up_id,
        )
        if row is None:
            raise NotFound(f"top-up {top_up_id} not found")
        return _TopUp(**dict(row))

    async def _begin(
        self, top_up: _TopUp, amount_micros: int, reason: str, idempotency_key: str
    ) -> RefundRow:
        await self._pool.execute(
            """INSERT INTO refunds (account_id, top_up_id, idempotency_key, requested_micros,
                                    reason, status)
               VALUES ($1, $2, $3, $4, $5, 'taking')
               ON CONFLICT (account_id, idempotency_key) DO NOTHING""",
            top_up.account_id,
            top_up.top_up_id,
            idempotency_key,
            amount_micros,
            reason,
        )
        stored = await self._pool.fetchrow(
            """SELECT refund_id, top_up_id, requested_micros, reason FROM refunds
               WHERE account_id = $1 AND idempotency_key = $2""",
            top_up.account_id,
            idempotency_key,
        )
        assert stored is not None
        if (stored["top_up_id"], stored["requested_micros"], stored["reason"]) != (
            top_up.top_up_id,
            amount_micros,
            reason,
        ):
            raise FailedPrecondition(
                f"idempotency_key {idempotency_key!r} was used for another refund"
            )
        return await self.get(stored["refund_id"])

    async def get(self, refund_id: int) -> RefundRow:
        row = await self._pool.fetchrow(
            """SELECT r.refund_id, r.account_id, r.top_up_id, r.requested_micros,
                      r.refunded_micros, r.status, r.refund_currency, r.refund_minor,
                      r.failure_reason, n.invoice_number AS credit_note_number
               FROM refunds r LEFT JOIN credit_notes n USING (refund_id)
               WHERE r.refund_id = $1""",
            refund_id,
        )
        if row is None:
            raise NotFound(f"refund {refund_id} not found")
        return RefundRow(**dict(row))

    # --- 1. out of the balance, onto the lot -------------------------------------

    async def _take(self, top_up: _TopUp, refund: RefundRow, reason: str) -> RefundRow:
        account_id = top_up.account_id
        # Loading takes the same exclusive lock on its own connection: do it first.
        if not await self._accounts.ensure_loaded(account_id):
            raise NotFound(f"account {account_id!r} not found")
        async with (
            self._pg.shard_lock([shard_of(account_id)], exclusive=True) as conn,
            conn.transaction(),
        ):
            lot = await lot_position(conn, credit_id=top_up.credit_id)
            if lot is None:
                raise FailedPrecondition(f"top-up {top_up.top_up_id} has no credit lot")
            # O2: expired credit is not refundable, even before the expiry job ran.
            lot_open = 0 if lot.expired else lot.open_micros
            most = lot_open if refund.requested_micros == 0 else refund.requested_micros
            taken = await self._hot.lot_take(
                account_id,
                f"refund:{refund.refund_id}",
                min(most, lot_open),
                lot_open,
                lot.open_before_micros,
            )
            if taken.code == ScriptCode.NOT_LOADED:
                raise Unavailable("account state is being rebuilt; retry the refund")
            await self._book(conn, top_up, lot, refund, taken.value, reason)
        return await self.get(refund.refund_id)

    async def _book(
        self,
        conn: Connection,
        top_up: _TopUp,
        lot: LotPosition,
        refund: RefundRow,
        taken: int,
        reason: str,
    ) -> None:
        if taken == 0:  # nothing left to refund: done, with nothing to pay back
            await conn.execute(
                """UPDATE refunds SET status = 'succeeded', resolved_at = now()
                   WHERE refund_id = $1""",
                refund.refund_id,
            )
            return
        credit = await book_take(
            self._pg,
            conn,
            lot,
            "refund",
            taken,
            f"refund of top-up {top_up.top_up_id}: {reason}",
            validation.system_key(f"refund-{refund.refund_id}"),
        )
        await conn.execute(
            """UPDATE refunds SET status = 'pending', refunded_micros = $2, credit_id = $3
               WHERE refund_id = $1""",
            refund.refund_id,
            taken,
            credit.credit_id,
        )

    # --- 2. through the payment gateway ------------------------------------------

    async def _pay(self, top_up: _TopUp, refund: RefundRow) -> RefundRow:
        currency = top_up.charge_currency or "USD"
        charged = top_up.charge_amount_minor or 0
        # Pro rata of what was charged, rounded down: never more than the share.
        minor = charged * refund.refunded_micros // top_up.credited_micros
        if minor == 0 or top_up.gateway_charge_id is None:
            await self._finish(refund, currency, minor, None)
            return await self.get(refund.refund_id)
        try:
            paid = await self._gateway.refund(
                top_up.gateway_charge_id,
                minor,
                currency,
                validation.system_key(f"refund-{refund.refund_id}"),
            )
        except GatewayUnavailable as exc:
            raise Unavailable(
                f"payment gateway unavailable ({exc}); refund {refund.refund_id} is pending:"
                " call again with the same idempotency_key"
            ) from exc
        except GatewayRejected as exc:
            await self._give_back(top_up, refund, str(exc))
            return await self.get(refund.refund_id)
        await self._finish(refund, paid.currency, paid.amount_minor, paid.refund_id)
        return await self.get(refund.refund_id)

    async def _finish(
        self, refund: RefundRow, currency: str, minor: int, gateway_refund_id: str | None
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            updated = await conn.execute(
                """UPDATE refunds SET status = 'succeeded', refund_currency = $2,
                                      refund_minor = $3, gateway_refund_id = $4,
                                      resolved_at = now()
                   WHERE refund_id = $1 AND status = 'pending'""",
                refund.refund_id,
                currency,
                minor,
                gateway_refund_id,
            )
            if updated != "UPDATE 1" or minor == 0:
                return
            number = await self._pg.next_invoice_number(conn)
            await conn.execute(
                """INSERT INTO credit_notes (invoice_number, account_id, refund_id, line,
                                             amount_minor, currency)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                number,
                refund.account_id,
                refund.refund_id,
                money.invoice_line(f"Refund of top-up #{refund.top_up_id}", -minor, currency),
                -minor,
                currency,
            )

    async def _give_back(self, top_up: _TopUp, refund: RefundRow, why: str) -> None:
        """The gateway refused: the money goes back to the lot and the balance."""
        account_id = top_up.account_id
        async with self._pg.shard_lock([shard_of(account_id)], exclusive=False) as conn:
            async with conn.transaction():
                updated = await conn.execute(
                    """UPDATE refunds SET status = 'failed', failure_reason = $2,
                                          resolved_at = now()
                       WHERE refund_id = $1 AND status = 'pending'""",
                    refund.refund_id,
                    why,
                )
                if updated != "UPDATE 1":
                    return
                await conn.execute(
                    """UPDATE credit_lots SET refunded_micros = refunded_micros - $2
                       WHERE credit_id = $1""",
                    top_up.credit_id,
                    refund.refunded_micros,
                )
                credit = await self._pg.record_credit(
                    conn,
                    account_id,
                    refund.refunded_micros,
                    f"refund {refund.refund_id} refused by the payment gateway",
                    validation.system_key(f"refund-{refund.refund_id}-reversed"),
                    MAX_SAFE_MICROS,
                    kind="refund",
                )
            await self._accounts.apply_recorded_credit(conn, credit)
