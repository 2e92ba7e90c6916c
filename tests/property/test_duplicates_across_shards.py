"""Issue 13 item 1, as a property: no account is credited for another's duplicate (P2).

Many accounts, each in a shard of its own, write usage whose stream entries share
ids across shards (every stream numbers its entries within one millisecond:
tests/flusher_helpers.align_usage_streams). Requests are authorized, and some are
authorized again after their record expired (a duplicate the flusher gives back
to that account). After every flush, each account's hot balance and ledger equal
its own model, whatever the other accounts did.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balance_gate.app import App
from balance_gate.keys import shard_of
from tests.flusher_helpers import (
    accounts_in_distinct_shards,
    align_usage_streams,
    expire_request_record,
    future_millis,
)
from tests.helpers import USD, ledger_balance, rid

ACCOUNTS = 6
START = 100 * USD
_examples = itertools.count()
_last_millis = 0

Op = tuple[str, int, int]  # (name, account index, amount or request index)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.integers(0, ACCOUNTS - 1), st.integers(0, USD)),
        st.tuples(st.just("repeat"), st.integers(0, ACCOUNTS - 1), st.integers(0, 50)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@dataclass
class Account:
    account_id: str
    balance: int = START  # what the ledger holds once everything is flushed
    requests: dict[str, int] = field(default_factory=dict)  # request id -> first amount


def _fresh_millis() -> int:
    """A millisecond later than any earlier example's ids (XSETID cannot go back)."""
    global _last_millis
    _last_millis = max(_last_millis + 1, future_millis())
    return _last_millis


async def _check_flushed(app: App, accounts: list[Account]) -> None:
    await app.flusher.drain()
    for account in accounts:
        hot = await app.hot.read_account(account.account_id)
        assert hot is not None
        assert (account.account_id, hot.balance_micros, hot.unflushed_micros) == (
            account.account_id,
            account.balance,
            0,
        )
        assert await ledger_balance(app, account.account_id) == account.balance


async def _step(app: App, redis_client: aioredis.Redis, accounts: list[Account], op: Op) -> None:
    name, index, value = op
    account = accounts[index]
    if name == "authorize":
        request_id = rid()
        assert (await app.gate.authorize(account.account_id, request_id, value, "")).allowed
        account.balance -= value
        account.requests[request_id] = value
    elif name == "repeat" and account.requests:
        # The same request id again after its record expired, at another amount: the
        # ledger keeps the first; the flusher gives this debit back, to this account.
        request_id = list(account.requests)[value % len(account.requests)]
        await expire_request_record(app, redis_client, account.account_id, request_id)
        again = await app.gate.authorize(account.account_id, request_id, value * 1_000, "")
        assert (again.allowed, again.replayed) == (True, False)
    elif name == "flush":
        await _check_flushed(app, accounts)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_issue13_item1_no_account_is_credited_for_another_accounts_duplicate(
    app: App, redis_client: aioredis.Redis, ops: list[Op]
) -> None:
    ids = accounts_in_distinct_shards(f"i13-prop-{next(_examples)}", ACCOUNTS)
    accounts = [Account(account_id) for account_id in ids]
    for account in accounts:
        await app.accounts.create(account.account_id, "USD")
        await app.accounts.credit(account.account_id, START, "start", rid())
    await align_usage_streams(app, redis_client, {shard_of(i) for i in ids}, _fresh_millis())
    for op in ops:
        await _step(app, redis_client, accounts, op)
    await _check_flushed(app, accounts)
