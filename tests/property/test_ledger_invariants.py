"""Hypothesis: money invariants over random sequences of operations, on real servers.

For any sequence of Authorize, Settle, replays, operator credits, flushes and
Redis data loss, the gate must agree with a plain Python model:
  - an Authorize is allowed exactly when the hot balance can pay (P1),
  - a replayed request id never debits again (P2); after Redis lost its request
    records, a retry is decided again, and its debit is given back when the
    flusher finds the request already in Postgres,
  - after a flush, the hot balance equals credited - used in Postgres,
  - used_micros equals the sum of the usage rows,
  - unconsumed lots minus unpaid usage equal the balance (issue 5).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balance_gate.app import App
from balance_gate.errors import FailedPrecondition
from tests.helpers import ledger_balance, rid

_accounts = itertools.count()

Op = tuple[str, int, int]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.integers(0, 400_000), st.just(0)),
        st.tuples(st.just("replay"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 600_000)),
        st.tuples(st.just("credit"), st.integers(-300_000, 600_000).filter(bool), st.just(0)),
        st.tuples(st.just("retry_forgotten"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
        st.tuples(st.just("lose_redis"), st.just(0), st.just(0)),
    ),
    max_size=30,
)


@dataclass
class Model:
    # The ledger's truth: what the account has once everything is flushed.
    balance: int
    # Debits of forgotten requests decided again, to be given back at the next flush.
    pending_reverts: int = 0
    # request_id -> (authorized, settled or None): allowed, known to Redis.
    requests: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    # request_id -> authorized: allowed before Redis lost its records.
    forgotten: dict[str, int] = field(default_factory=dict)
    # Forgotten requests decided again since the last loss (Redis knows them again).
    redecided: set[str] = field(default_factory=set)

    @property
    def hot(self) -> int:
        return self.balance - self.pending_reverts


def _pick(ids: list[str], index: int) -> str | None:
    return ids[index % len(ids)] if ids else None


async def _check_flushed(app: App, account_id: str, model: Model) -> None:
    await app.flusher.drain()
    model.pending_reverts = 0
    assert await app.accounts.ensure_loaded(account_id)  # after lose_redis: rebuilt from Postgres
    hot = await app.hot.read_account(account_id)
    assert hot is not None
    assert (hot.balance_micros, hot.unflushed_micros) == (model.balance, 0)
    assert await ledger_balance(app, account_id) == model.balance
    row = await app.pg.get_account(account_id)
    assert row is not None
    assert row.used_micros == await app.pg.usage_total(account_id)
    # Issue 5: the lots account for every micro of the balance.
    assert await app.pg.lot_balance(account_id) == model.balance


async def _step(
    app: App, redis_client: aioredis.Redis, account_id: str, model: Model, op: Op
) -> None:
    name, a, b = op
    if name == "authorize":
        request_id = rid()
        decision = await app.gate.authorize(account_id, request_id, a, "")
        assert decision.allowed == (model.hot >= a)
        if decision.allowed:
            model.balance -= a
            model.requests[request_id] = (a, None)
        assert decision.balance_micros == model.hot
    elif name == "replay" and (known := _pick(list(model.requests), a)):
        authorized, _ = model.requests[known]
        decision = await app.gate.authorize(account_id, known, authorized, "")
        assert (decision.allowed, decision.replayed, decision.balance_micros) == (
            True,
            True,
            model.hot,
        )
    elif name == "settle" and (known := _pick(list(model.requests), a)):
        authorized, settled = model.requests[known]
        if settled is not None and settled != b:
            try:
                await app.gate.settle(account_id, known, b)
            except FailedPrecondition:
                return
            raise AssertionError("a settled cost changed")
        result = await app.gate.settle(account_id, known, b)
        if settled is None:
            model.balance -= b - authorized
            model.requests[known] = (authorized, b)
        assert result.balance_micros == model.hot
    elif name == "credit":
        view = await app.accounts.credit(account_id, a, "adjust", rid())
        model.balance += a
        assert view.balance_micros == model.hot
    elif name == "retry_forgotten" and (forgotten := _pick(list(model.forgotten), a)):
        amount = model.forgotten[forgotten]
        decision = await app.gate.authorize(account_id, forgotten, amount, "")
        if forgotten in model.redecided:
            assert (decision.allowed, decision.replayed) == (True, True)
        else:
            assert decision.allowed == (model.hot >= amount)
            if decision.allowed:
                model.pending_reverts += amount
                model.redecided.add(forgotten)
        assert decision.balance_micros == model.hot
    elif name == "flush":
        await _check_flushed(app, account_id, model)
    elif name == "lose_redis":
        await _check_flushed(app, account_id, model)
        await redis_client.flushall()
        await app.hot.ensure_usage_groups()
        model.forgotten.update({r: amount for r, (amount, _) in model.requests.items()})
        model.requests.clear()
        model.redecided.clear()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_gate_agrees_with_the_model(
    app: App, redis_client: aioredis.Redis, ops: list[Op]
) -> None:
    account_id = f"prop-{next(_accounts)}"
    await app.accounts.create(account_id, "USD")
    await app.accounts.credit(account_id, 1_000_000, "start", rid())
    model = Model(balance=1_000_000)
    for op in ops:
        await _step(app, redis_client, account_id, model, op)
    await _check_flushed(app, account_id, model)
