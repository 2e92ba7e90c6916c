"""Hypothesis: credit lots stay exact under random sequences, on real Redis and Postgres.

Random sequences of authorize, settle, top-up, operator credit, refund, expiry
(the clock moving past a lot's expiry) and flush. After every step, once the
flusher has drained:
  - unconsumed lots minus unpaid usage equal the ledger balance (issue 5),
  - the hot balance equals the ledger balance,
  - no lot was refunded more than it had unconsumed: consumed + refunded +
    expired never exceeds its amount (P13, O2),
  - every refund is bounded by what its top-up had left.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balance_gate.app import App
from tests.helpers import USD, ledger_balance, rid

_accounts = itertools.count()
CENT = 10_000

Op = tuple[str, int, int]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.integers(0, 300).map(lambda c: c * CENT), st.just(0)),
        st.tuples(
            st.just("settle"), st.integers(0, 20), st.integers(0, 400).map(lambda c: c * CENT)
        ),
        st.tuples(st.just("top_up"), st.integers(1, 5).map(lambda d: d * USD), st.just(0)),
        st.tuples(
            st.just("credit"),
            st.integers(-200, 300).filter(bool).map(lambda c: c * CENT),
            st.just(0),
        ),
        st.tuples(
            st.just("refund"), st.integers(0, 10), st.integers(0, 300).map(lambda c: c * CENT)
        ),
        st.tuples(st.just("expire"), st.integers(0, 10), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
    ),
    max_size=15,
)


async def _check(app: App, account_id: str) -> None:
    await app.flusher.drain()
    ledger = await ledger_balance(app, account_id)
    assert await app.pg.lot_balance(account_id) == ledger
    hot = await app.hot.read_account(account_id)
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (ledger, 0)
    overdrawn = await app.pool.fetchval(
        """SELECT count(*) FROM credit_lots WHERE account_id = $1
             AND consumed_micros + refunded_micros + expired_micros > amount_micros""",
        account_id,
    )
    assert overdrawn == 0


async def _step(app: App, account_id: str, state: dict[str, list[int | str]], op: Op) -> None:
    kind, a, b = op
    top_ups, requests = state["top_ups"], state["requests"]
    if kind == "authorize":
        request_id = rid()
        if (await app.gate.authorize(account_id, request_id, a, "")).allowed:
            requests.append(request_id)
    elif kind == "settle" and requests:
        request_id = str(requests.pop(a % len(requests)))  # each request settles once
        await app.gate.settle(account_id, request_id, b)
    elif kind == "top_up":
        top_up = await app.topups.manual(account_id, a, rid())
        assert top_up.status == "succeeded"
        top_ups.append(top_up.top_up_id)
    elif kind == "credit":
        ledger = await ledger_balance(app, account_id)
        if ledger + a > -10 * USD:  # keep debts modest: an operator would
            await app.accounts.credit(account_id, a, "model", rid())
    elif kind == "refund" and top_ups:
        top_up_id = int(top_ups[a % len(top_ups)])
        before = await _open_part(app, top_up_id)
        refund = await app.refunds.refund_top_up(top_up_id, b, "model", rid())
        assert refund.refunded_micros <= before  # never more than was unconsumed
        if b:
            assert refund.refunded_micros <= b
    elif kind == "expire":
        lot_ids = await app.pool.fetch(
            "SELECT lot_id FROM credit_lots WHERE account_id = $1 ORDER BY lot_id", account_id
        )
        if lot_ids:
            lot_id = lot_ids[a % len(lot_ids)]["lot_id"]
            await app.pool.execute(  # the clock moves past this lot's expiry
                "UPDATE credit_lots SET expires_at = now() - interval '1 second' WHERE lot_id = $1",
                lot_id,
            )
            await app.expiry.expire_due()
    await _check(app, account_id)


async def _open_part(app: App, top_up_id: int) -> int:
    """What the top-up's lot still holds, with the usage Redis decided burnt in."""
    await app.flusher.drain()
    open_part: int = await app.pool.fetchval(
        """SELECT CASE WHEN l.expires_at <= now() THEN 0
                       ELSE l.amount_micros - l.consumed_micros - l.refunded_micros
                            - l.expired_micros END
           FROM credit_lots l JOIN top_ups t ON t.credit_id = l.credit_id
           WHERE t.top_up_id = $1""",
        top_up_id,
    )
    return open_part


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_lots_stay_exact_under_any_sequence(app: App, ops: list[Op]) -> None:
    account_id = f"lots-{next(_accounts)}"
    await app.accounts.create(account_id, "USD")
    await app.topups.set_payment_methods(account_id, "pm_card_visa", "")
    state: dict[str, list[int | str]] = {"top_ups": [], "requests": []}
    for op in ops:
        await _step(app, account_id, state, op)
    await _check(app, account_id)
