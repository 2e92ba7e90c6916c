"""Credit lines (C1, C2): a limit that lets the balance go below zero, and the
profile a reviewer needs. Written to Postgres first, then the floor to Redis,
under the shard's shared lock, like a credit.

Built so far: the limit (authorize.lua's floor), the C4 stop-loss (high-cost
capabilities blocked and an optional rate cap once the balance reaches the
stop-loss point, in authorize.lua), the deposit, the review schedule and the C2
profile. Capability names are kept in one spelling (validation.normalize_capability).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import asyncpg

from balance_gate import validation
from balance_gate.constants import MAX_CAPABILITY_BYTES, MAX_CREDIT_MICROS
from balance_gate.errors import InvalidArgument, NotFound
from balance_gate.keys import credit_line_fields, shard_of
from balance_gate.postgres_store import PostgresStore
from balance_gate.redis_store import FieldsWritten, RedisStore

MAX_HIGH_COST_CAPABILITIES = 64


@dataclass(frozen=True, slots=True)
class CreditLine:
    account_id: str
    limit_micros: int
    deposit_micros: int
    review_every_days: int
    next_review_on: dt.date
    high_cost_capabilities: tuple[str, ...]
    stop_loss_share_pct: int = 100
    stop_loss_rate_per_s: int = 0
    entity: str = ""
    payment_terms_days: int = 30
    expected_monthly_micros: int = 0
    expected_peak_micros: int = 0
    expected_high_cost_share_pct: int = 0


def _check(line: CreditLine) -> None:
    validation.check_id("account_id", line.account_id)
    for name in (
        "limit_micros",
        "deposit_micros",
        "expected_monthly_micros",
        "expected_peak_micros",
    ):
        value = getattr(line, name)
        if not 0 <= value <= MAX_CREDIT_MICROS:
            raise InvalidArgument(name, f"must be between 0 and {MAX_CREDIT_MICROS}")
    if not 1 <= line.review_every_days <= 366:
        raise InvalidArgument("review_every_days", "must be between 1 and 366")
    if not 1 <= line.stop_loss_share_pct <= 100:
        raise InvalidArgument("stop_loss.share_pct", "must be between 1 and 100")
    if line.stop_loss_rate_per_s < 0:
        raise InvalidArgument("stop_loss.rate_per_s", "must not be negative")
    if not 0 <= line.expected_high_cost_share_pct <= 100:
        raise InvalidArgument("expected_high_cost_share_pct", "must be between 0 and 100")
    if not 0 <= line.payment_terms_days <= 366:
        raise InvalidArgument("payment_terms_days", "must be between 0 and 366")
    if len(line.high_cost_capabilities) > MAX_HIGH_COST_CAPABILITIES:
        raise InvalidArgument(
            "high_cost_capabilities", f"at most {MAX_HIGH_COST_CAPABILITIES} entries"
        )
    for capability in line.high_cost_capabilities:
        # As a request's capability is checked (raw), then normalized: the same names fit.
        if len(capability.encode()) > MAX_CAPABILITY_BYTES:
            raise InvalidArgument(
                "high_cost_capabilities", f"each must be at most {MAX_CAPABILITY_BYTES} bytes"
            )
        validation.check_capability(capability)
        if not validation.normalize_capability(capability):
            raise InvalidArgument("high_cost_capabilities", "each must name a capability")
    if line.entity:
        validation.check_reason(line.entity, field="entity")


class CreditLines:
    def __init__(
        self,
        pool: asyncpg.Pool,
        pg: PostgresStore,
        hot: RedisStore,
        release_lease: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        self._pg = pg
        self._hot = hot
        # This sidecar's own lease on an account it cuts goes back at once (leases.py).
        self._release_lease = release_lease

    async def set(self, line: CreditLine) -> CreditLine:
        """Create or change the account's line (C1: the operator sets the limit)."""
        _check(line)
        # C4: stored in the spelling requests are compared in (validation.normalize_capability).
        line = replace(
            line,
            high_cost_capabilities=validation.normalized_capabilities(line.high_cost_capabilities),
        )
        async with self._pg.shard_lock([shard_of(line.account_id)], exclusive=False) as conn:
            try:
                await conn.execute(
                    """INSERT INTO credit_lines AS l (account_id, limit_micros, deposit_micros,
                           review_every_days, next_review_on, high_cost_capabilities,
                           stop_loss_share_pct, stop_loss_rate_per_s, entity,
                           payment_terms_days, expected_monthly_micros, expected_peak_micros,
                           expected_high_cost_share_pct)
                       VALUES ($1, $2, $3, $4, current_date + $4::int, $5, $6, $7, $8, $9, $10,
                               $11, $12)
                       ON CONFLICT (account_id) DO UPDATE SET
                           limit_micros = $2, deposit_micros = $3, review_every_days = $4,
                           high_cost_capabilities = $5, stop_loss_share_pct = $6,
                           stop_loss_rate_per_s = $7, entity = $8, payment_terms_days = $9,
                           expected_monthly_micros = $10, expected_peak_micros = $11,
                           expected_high_cost_share_pct = $12, updated_at = now()""",
                    line.account_id,
                    line.limit_micros,
                    line.deposit_micros,
                    line.review_every_days,
                    list(line.high_cost_capabilities),
                    line.stop_loss_share_pct,
                    line.stop_loss_rate_per_s,
                    line.entity,
                    line.payment_terms_days,
                    line.expected_monthly_micros,
                    line.expected_peak_micros,
                    line.expected_high_cost_share_pct,
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFound(f"account {line.account_id!r} not found") from None
            # Not loaded: the next load reads the line from credit_lines. A cut (a
            # raised floor or stop point, changed high-cost names) recalls the leases
            # in the same script (issue 13 item 5).
            written = await self._hot.set_credit_line(
                line.account_id,
                credit_line_fields(
                    line.limit_micros,
                    line.stop_loss_share_pct,
                    line.high_cost_capabilities,
                    line.stop_loss_rate_per_s,
                ),
            )
        if written == FieldsWritten.RECALLED and self._release_lease is not None:
            await self._release_lease(line.account_id)
        return await self.get(line.account_id)

    async def get(self, account_id: str) -> CreditLine:
        validation.check_id("account_id", account_id)
        row = await self._pool.fetchrow(
            """SELECT account_id, limit_micros, deposit_micros, review_every_days,
                      next_review_on, high_cost_capabilities, stop_loss_share_pct,
                      stop_loss_rate_per_s, entity, payment_terms_days,
                      expected_monthly_micros, expected_peak_micros,
                      expected_high_cost_share_pct
               FROM credit_lines WHERE account_id = $1""",
            account_id,
        )
        if row is None:
            raise NotFound(f"account {account_id!r} has no credit line")
        values = dict(row)
        # Lines stored before names were normalized are read normalized (C4).
        values["high_cost_capabilities"] = validation.normalized_capabilities(
            values["high_cost_capabilities"]
        )
        return CreditLine(**values)
