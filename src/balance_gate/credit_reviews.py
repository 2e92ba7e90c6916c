"""C3: credit line reviews. A job (safe on every sidecar: one open review per
account) opens a review when a line's review date has come, or early when a
trigger fires: N consecutive overdue invoices, yesterday's spend above k times
the trailing 30-day daily average, or the high-cost share of the last 7 days'
spend above the expected share by a margin. Opening a review can cut the
limit by a configured percentage at once. The operator closes it with a
decision and, optionally, a new limit; the next review date moves on.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, replace

import asyncpg

from balance_gate import validation
from balance_gate.credit_lines import CreditLine, CreditLines
from balance_gate.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReviewRules:
    overdue_invoices: int = 2  # this many consecutive overdue invoices
    surge_factor: float = 3.0  # yesterday > factor x the trailing 30-day daily average
    high_cost_margin_pct: int = 10  # share above the expected one by this many points
    auto_cut_pct: int = 0  # cut the limit by this much when a review opens (0: never)


@dataclass(frozen=True, slots=True)
class Review:
    review_id: int
    account_id: str
    reason: str
    detail: str
    opened_at: dt.datetime
    limit_before: int
    limit_cut_to: int | None
    status: str
    closed_at: dt.datetime | None
    decision: str | None
    new_limit: int | None


class CreditReviews:
    def __init__(self, pool: asyncpg.Pool, lines: CreditLines, rules: ReviewRules) -> None:
        self._pool = pool
        self._lines = lines
        self._rules = rules

    async def run(self, today: dt.date | None = None) -> list[Review]:
        """Open the reviews that are due or triggered; the ones opened now."""
        today = today or dt.datetime.now(dt.UTC).date()
        opened = []
        ids = await self._pool.fetch("SELECT account_id FROM credit_lines ORDER BY account_id")
        for row in ids:
            line = await self._lines.get(row["account_id"])
            reason = await self._trigger(line, today)
            if reason is not None:
                review = await self._open(line, *reason)
                if review is not None:
                    opened.append(review)
        return opened

    async def _trigger(self, line: CreditLine, today: dt.date) -> tuple[str, str] | None:
        if line.next_review_on <= today:
            return "scheduled", f"review due on {line.next_review_on.isoformat()}"
        overdue = await self._consecutive_overdue(line.account_id)
        if overdue >= self._rules.overdue_invoices:
            return "overdue_invoices", f"{overdue} consecutive overdue invoices"
        yesterday, average = await self._spend(line.account_id, today)
        if average > 0 and yesterday > self._rules.surge_factor * average:
            return "usage_surge", f"yesterday {yesterday} micros, 30-day average {average:.0f}"
        share = await self._high_cost_share(line, today)
        expected = line.expected_high_cost_share_pct
        if share is not None and share > expected + self._rules.high_cost_margin_pct:
            return "high_cost_share", f"high-cost share {share:.0f}% (expected {expected}%)"
        return None

    async def _consecutive_overdue(self, account_id: str) -> int:
        rows = await self._pool.fetch(
            """SELECT overdue FROM invoices WHERE account_id = $1
               ORDER BY invoice_number DESC LIMIT 100""",
            account_id,
        )
        count = 0
        for row in rows:
            if not row["overdue"]:
                break
            count += 1
        return count

    async def _spend(self, account_id: str, today: dt.date) -> tuple[int, float]:
        """(yesterday's spend, the daily average of the 30 days before it), micro-USD (UTC days)."""
        row = await self._pool.fetchrow(
            """SELECT
                 coalesce(sum(amount_micros) FILTER (WHERE occurred_at >= $2::date - 1
                                                       AND occurred_at < $2::date), 0) AS yesterday,
                 coalesce(sum(amount_micros) FILTER (WHERE occurred_at >= $2::date - 31
                                                       AND occurred_at < $2::date - 1), 0) AS before
               FROM usage_events WHERE account_id = $1 AND occurred_at >= $2::date - 31""",
            account_id,
            today,
        )
        assert row is not None
        return int(row["yesterday"]), int(row["before"]) / 30

    async def _high_cost_share(self, line: CreditLine, today: dt.date) -> float | None:
        if not line.high_cost_capabilities:
            return None
        row = await self._pool.fetchrow(
            """SELECT coalesce(sum(amount_micros), 0) AS total,
                      coalesce(sum(amount_micros) FILTER (WHERE capability = ANY($3)), 0) AS high
               FROM usage_events
               WHERE account_id = $1 AND occurred_at >= $2::date - 7 AND occurred_at < $2::date""",
            line.account_id,
            today,
            list(line.high_cost_capabilities),
        )
        assert row is not None
        return None if row["total"] <= 0 else 100 * row["high"] / row["total"]

    async def _open(self, line: CreditLine, reason: str, detail: str) -> Review | None:
        cut_to = None
        if self._rules.auto_cut_pct:
            cut_to = line.limit_micros * (100 - self._rules.auto_cut_pct) // 100
        try:
            review_id = await self._pool.fetchval(
                """INSERT INTO credit_reviews (account_id, reason, detail, limit_before,
                                               limit_cut_to)
                   VALUES ($1, $2, $3, $4, $5) RETURNING review_id""",
                line.account_id,
                reason,
                detail,
                line.limit_micros,
                cut_to,
            )
        except asyncpg.UniqueViolationError:
            return None  # already under review (or another sidecar was first)
        if cut_to is not None:
            await self._lines.set(replace(line, limit_micros=cut_to))
        log.info("credit review %d opened for %r: %s", review_id, line.account_id, detail)
        return await self.get(review_id)

    async def close(self, review_id: int, decision: str, new_limit: int | None) -> Review:
        validation.check_reason(decision, field="decision")
        if new_limit is not None and new_limit < 0:
            raise InvalidArgument("new_limit_micros", "must not be negative")
        review = await self.get(review_id)
        if review.status != "open":
            raise FailedPrecondition(f"review {review_id} is already closed")
        line = await self._lines.get(review.account_id)
        limit = line.limit_micros if new_limit is None else new_limit
        await self._pool.execute(
            """UPDATE credit_lines SET next_review_on = current_date + review_every_days
               WHERE account_id = $1""",
            review.account_id,
        )
        await self._lines.set(replace(line, limit_micros=limit))
        await self._pool.execute(
            """UPDATE credit_reviews SET status = 'closed', closed_at = now(), decision = $2,
                                         new_limit = $3
               WHERE review_id = $1""",
            review_id,
            decision,
            limit,
        )
        return await self.get(review_id)

    async def list(self, account_id: str) -> list[Review]:
        validation.check_id("account_id", account_id)
        rows = await self._pool.fetch(
            "SELECT * FROM credit_reviews WHERE account_id = $1 ORDER BY review_id", account_id
        )
        return [Review(**dict(row)) for row in rows]

    async def get(self, review_id: int) -> Review:
        row = await self._pool.fetchrow(
            "SELECT * FROM credit_reviews WHERE review_id = $1", review_id
        )
        if row is None:
            raise NotFound(f"credit review {review_id} not found")
        return Review(**dict(row))

    async def mark_invoice(self, invoice_number: int, *, overdue: bool) -> None:
        """MarkInvoiceOverdue / MarkInvoicePaid (the overdue trigger counts these)."""
        done = await self._pool.execute(
            """UPDATE invoices SET overdue = $2,
                                   paid_at = CASE WHEN $2 THEN NULL ELSE now() END
               WHERE invoice_number = $1""",
            invoice_number,
            overdue,
        )
        if done == "UPDATE 0":
            raise NotFound(f"invoice {invoice_number} not found")
