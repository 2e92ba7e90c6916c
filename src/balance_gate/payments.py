"""Payment gateways: the interface the top-up code charges through, and the sandbox.

Amounts are in the charged currency's minor units (cents), as processors take
them. Every charge carries an idempotency key: charging again with the same key
returns the first outcome and never charges twice.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Protocol

import asyncpg


class GatewayUnavailable(Exception):
    """The gateway did not answer (network error, timeout): the outcome is unknown.

    Retry with the same idempotency key, or look the key up."""


class GatewayRejected(Exception):
    """The gateway refused the request itself (bad token, bad request): retrying will
    not help; the top-up fails with gateway_rejected."""


@dataclass(frozen=True, slots=True)
class Charge:
    charge_id: str
    succeeded: bool
    # The card network's reason when declined: generic_decline,
    # insufficient_funds, fraudulent, invalid_payment_method.
    decline_code: str | None
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class Refund:
    refund_id: str
    amount_minor: int
    currency: str


class PaymentGateway(Protocol):
    async def card_currency(self, payment_method: str) -> str: ...

    async def charge(
        self, payment_method: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> Charge: ...

    async def lookup(self, idempotency_key: str) -> Charge | None: ...

    async def refund(
        self, charge_id: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> Refund:
        """Give back part of a succeeded charge, once per key.

        GatewayRejected: the processor refuses (more than the charge has left,
        unknown charge). GatewayUnavailable: unknown outcome; retry with the key.
        """
        ...


def mask(payment_method: str) -> str:
    """Never show a token in full: 'pm_card_visa' -> 'pm_…visa'."""
    if len(payment_method) <= 8:
        return "…" + payment_method[-2:]
    return f"{payment_method[:3]}…{payment_method[-4:]}"


_SUCCEED_N = re.compile(r"^pm_card_succeed_(\d+)_then_decline$")
_DECLINES = {
    "pm_card_declined": "generic_decline",
    "pm_card_insufficient_funds": "insufficient_funds",
    "pm_card_fraudulent": "fraudulent",
}
_SUCCEEDS = {"pm_card_visa", "pm_card_eur"}


class SandboxGateway:
    """Behaves like a card processor's test mode, with its charges kept in Postgres.

    Tokens: pm_card_visa (USD, succeeds), pm_card_eur (EUR, succeeds),
    pm_card_declined (generic_decline), pm_card_insufficient_funds,
    pm_card_fraudulent (blocked by risk checks), pm_card_network_error (times
    out, charges nothing), pm_card_succeed_N_then_decline (N successes, then
    generic_decline). Anything else is declined invalid_payment_method.
    """

    def __init__(self, pool: asyncpg.Pool, timeout_s: float = 0.05) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def card_currency(self, payment_method: str) -> str:
        return "EUR" if payment_method == "pm_card_eur" else "USD"

    async def charge(
        self, payment_method: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> Charge:
        earlier = await self.lookup(idempotency_key)
        if earlier is not None:
            return earlier
        if payment_method == "pm_card_network_error":
            await asyncio.sleep(self._timeout_s)
            raise GatewayUnavailable("sandbox: the charge request timed out")
        decline = await self._decline_code(payment_method)
        row = await self._pool.fetchrow(
            """INSERT INTO sandbox_charges (idempotency_key, charge_id, payment_method,
                                            amount_minor, currency, succeeded, decline_code)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (idempotency_key) DO NOTHING RETURNING *""",
            idempotency_key,
            f"ch_{uuid.uuid4().hex[:24]}",
            payment_method,
            amount_minor,
            currency,
            decline is None,
            decline,
        )
        if row is None:  # a concurrent call with the same key won
            stored = await self.lookup(idempotency_key)
            assert stored is not None
            return stored
        return _charge(row)

    async def lookup(self, idempotency_key: str) -> Charge | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM sandbox_charges WHERE idempotency_key = $1", idempotency_key
        )
        return None if row is None else _charge(row)

    async def refund(
        self, charge_id: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> Refund:
        async with self._pool.acquire() as conn, conn.transaction():
            earlier = await conn.fetchrow(
                "SELECT * FROM sandbox_refunds WHERE idempotency_key = $1", idempotency_key
            )
            if earlier is not None:
                return _refund(earlier)
            charge = await conn.fetchrow(
                "SELECT * FROM sandbox_charges WHERE charge_id = $1 FOR UPDATE", charge_id
            )
            if charge is None or not charge["succeeded"]:
                raise GatewayRejected(f"sandbox: no succeeded charge {charge_id!r}")
            if currency != charge["currency"] or amount_minor <= 0:
                raise GatewayRejected("sandbox: a refund is in the charge's currency, above 0")
            refunded = await conn.fetchval(
                "SELECT coalesce(sum(amount_minor), 0) FROM sandbox_refunds WHERE charge_id = $1",
                charge_id,
            )
            if refunded + amount_minor > charge["amount_minor"]:
                raise GatewayRejected("sandbox: more than the charge has left to refund")
            row = await conn.fetchrow(
                """INSERT INTO sandbox_refunds (idempotency_key, refund_id, charge_id,
                                                amount_minor, currency)
                   VALUES ($1, $2, $3, $4, $5) RETURNING *""",
                idempotency_key,
                f"re_{uuid.uuid4().hex[:24]}",
                charge_id,
                amount_minor,
                currency,
            )
        assert row is not None
        return _refund(row)

    async def _decline_code(self, payment_method: str) -> str | None:
        if payment_method in _SUCCEEDS:
            return None
        if payment_method in _DECLINES:
            return _DECLINES[payment_method]
        match = _SUCCEED_N.match(payment_method)
        if match is None:
            return "invalid_payment_method"
        succeeded = await self._pool.fetchval(
            "SELECT count(*) FROM sandbox_charges WHERE payment_method = $1 AND succeeded",
            payment_method,
        )
        return None if succeeded < int(match[1]) else "generic_decline"


def _charge(row: asyncpg.Record) -> Charge:
    return Charge(
        charge_id=row["charge_id"],
        succeeded=row["succeeded"],
        decline_code=row["decline_code"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
    )


def _refund(row: asyncpg.Record) -> Refund:
    return Refund(row["refund_id"], row["amount_minor"], row["currency"])
