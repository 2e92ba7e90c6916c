"""C3: credit line reviews, when due or early on overdue invoices, surges, high-cost share."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from balance_gate.app import App
from balance_gate.credit_lines import CreditLine
from balance_gate.credit_reviews import CreditReviews, ReviewRules
from balance_gate.v1 import admin_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, fund, rid

TODAY = dt.datetime.now(dt.UTC).date()


async def _line(app: App, account_id: str, **extra: object) -> None:
    await fund(app, account_id, 1 * USD)
    await app.credit_lines.set(
        CreditLine(
            account_id=account_id,
            limit_micros=4 * USD,
            deposit_micros=0,
            review_every_days=30,
            next_review_on=TODAY,
            high_cost_capabilities=("gpt-4o",),
            **extra,  # type: ignore[arg-type]
        )
    )


async def test_c3_a_review_opens_when_due_and_closing_it_sets_the_limit(app: App) -> None:
    await _line(app, "c3-due")
    assert await app.credit_reviews.run(TODAY) == []  # not due for 30 days
    [review] = await app.credit_reviews.run(TODAY + dt.timedelta(days=30))
    assert (review.reason, review.status, review.limit_before) == ("scheduled", "open", 4 * USD)
    assert await app.credit_reviews.run(TODAY + dt.timedelta(days=31)) == []  # one open review
    closed = await app.credit_reviews.close(review.review_id, "reduce: slow payer", 1 * USD)
    assert (closed.status, closed.new_limit) == ("closed", 1 * USD)
    assert (await app.credit_lines.get("c3-due")).limit_micros == 1 * USD
    # The new limit is the floor at once: $1 funded + $1 of credit. (A request naming
    # no capability would be stopped at the stop point, here the limit: C4.)
    assert (await app.gate.authorize("c3-due", rid(), 2 * USD, "small-model")).allowed
    assert not (await app.gate.authorize("c3-due", rid(), 1, "small-model")).allowed


async def test_c3_consecutive_overdue_invoices_open_a_review_that_cuts_the_limit(
    app: App,
) -> None:
    await _line(app, "c3-late")
    await app.topups.set_payment_methods("c3-late", "pm_card_visa", "")
    for _ in range(2):
        await app.topups.manual("c3-late", 1 * USD, rid())
    invoices = [i.invoice_number for i in await app.topups.list_invoices("c3-late")]
    reviews = CreditReviews(app.pool, app.credit_lines, ReviewRules(auto_cut_pct=50))
    await reviews.mark_invoice(invoices[-1], overdue=True)
    assert await reviews.run(TODAY) == []  # one overdue invoice is not a pattern
    await reviews.mark_invoice(invoices[-2], overdue=True)
    [review] = await reviews.run(TODAY)
    assert review.reason == "overdue_invoices"
    assert review.limit_cut_to == 2 * USD
    assert (await app.credit_lines.get("c3-late")).limit_micros == 2 * USD


async def test_c3_a_usage_surge_opens_a_review(app: App) -> None:
    await _line(app, "c3-surge")
    # The month before: 30 cents of usage (rows only: the review reads usage rows).
    await app.pool.execute(
        """INSERT INTO usage_events (account_id, request_id, kind, amount_micros, occurred_at,
                                     stream_entry_id)
           VALUES ('c3-surge', 'old', 'authorize', 300000, now() - interval '10 days', '0-1')"""
    )
    assert (await app.gate.authorize("c3-surge", rid(), 2 * USD, "")).allowed
    await app.flusher.drain()
    [review] = await app.credit_reviews.run(TODAY + dt.timedelta(days=1))  # today is yesterday
    assert review.reason == "usage_surge"


async def test_c3_a_rising_high_cost_share_opens_a_review(app: App) -> None:
    await _line(app, "c3-share", expected_high_cost_share_pct=10)
    assert (await app.gate.authorize("c3-share", rid(), 1 * USD, "gpt-4o")).allowed
    assert (await app.gate.authorize("c3-share", rid(), 1 * USD, "small")).allowed
    await app.flusher.drain()
    [review] = await app.credit_reviews.run(TODAY + dt.timedelta(days=1))
    assert review.reason == "high_cost_share"
    assert "50%" in review.detail


async def test_c3_reviews_over_grpc(running: RunningGate) -> None:
    reviews = await running.admin.ListCreditReviews(
        admin_pb2.ListCreditReviewsRequest(account_id="nobody")
    )
    assert list(reviews.reviews) == []
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await running.admin.MarkInvoiceOverdue(admin_pb2.MarkInvoiceRequest(invoice_number=9999))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await running.admin.CloseCreditReview(
            admin_pb2.CloseCreditReviewRequest(review_id=9999, decision="keep")
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
