"""Issue 13, as a Hypothesis state machine: money stays exact when things repeat.

Accounts in shards of their own write usage whose stream entries share ids
across shards (`align_streams`: every stream numbers its next entries within
one future millisecond). Rules mix new authorizations, replays, request ids
reused after their record expired (PEXPIRE: duplicates the flusher reverts),
settles up and down (also of reused ids: issue 13 item 2), operator credits
and debits, and a Redis reload (the account's hash and request records lost,
then loaded again from Postgres).

The model is the ledger's rule (docs/reliability.md, "Settles follow the
ledger"): per request id, the first authorization and the first settle count,
and a settled request costs its final amount. After every step, once flushed,
each account's hot balance and ledger balance equal its own model (so no
account's money moved because of another's events), used_micros is the sum
of the usage rows, and no request's rows sum below 0.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio.cluster import RedisCluster

from balance_gate.app import App
from balance_gate.errors import FailedPrecondition
from balance_gate.keys import shard_of
from balance_gate.settings import Settings
from tests.conftest import CLUSTER
from tests.flusher_helpers import (
    accounts_in_distinct_shards,
    align_usage_streams,
    expire_request_record,
    future_millis,
)
from tests.helpers import USD, rid

ACCOUNTS = 3
START = 20 * USD
_machines = itertools.count()
T = TypeVar("T")
_last_millis = 0

amounts = st.integers(0, 3 * USD)
account_index = st.integers(0, ACCOUNTS - 1)
pick = st.integers(0, 1_000)


@dataclass
class Request:
    """One request id: what the ledger holds for it, and what Redis remembers."""

    ledger_authorized: int
    ledger_final: int | None = None
    # Redis's record: (authorized, settled or None); None once expired or lost.
    redis: tuple[int, int | None] | None = None

    @property
    def cost(self) -> int:
        return self.ledger_authorized if self.ledger_final is None else self.ledger_final


@dataclass
class Account:
    account_id: str
    credited: int = START
    requests: dict[str, Request] = field(default_factory=dict)
    top_ups: list[int] = field(default_factory=list)  # ids of succeeded top-ups

    @property
    def balance(self) -> int:
        return self.credited - sum(r.cost for r in self.requests.values())

    def pick(self, index: int) -> tuple[str, Request] | None:
        if not self.requests:
            return None
        request_id = list(self.requests)[index % len(self.requests)]
        return request_id, self.requests[request_id]


def _fresh_millis() -> int:
    """A millisecond later than any id written so far (XSETID cannot go back)."""
    global _last_millis
    _last_millis = max(_last_millis + 1, future_millis())
    return _last_millis


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, runner: asyncio.Runner, app: App, redis_client: aioredis.Redis) -> None:
        super().__init__()
        self.runner = runner
        self.app = app
        self.redis = redis_client
        self.accounts: list[Account] = []

    def run(self, step: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(step)

    @initialize(first=st.lists(amounts, min_size=2 * ACCOUNTS, max_size=2 * ACCOUNTS))
    def open_accounts(self, first: list[int]) -> None:
        """Funded accounts in shards of their own, two requests each to work on."""
        ids = accounts_in_distinct_shards(f"i13-sm-{next(_machines)}", ACCOUNTS)
        self.accounts = [Account(account_id) for account_id in ids]
        for account in self.accounts:
            self.run(self.app.accounts.create(account.account_id, "USD"))
            self.run(self.app.accounts.credit(account.account_id, START, "start", rid()))
            self.run(self.app.topups.set_payment_methods(account.account_id, "pm_card_visa", ""))
        self.align_streams()
        for n, amount in enumerate(first):
            self.authorize(n % ACCOUNTS, amount)

    @rule()
    def align_streams(self) -> None:
        """The next entries of every account's stream share ids: <ms>-1, <ms>-2, ..."""
        shards = {shard_of(account.account_id) for account in self.accounts}
        self.run(align_usage_streams(self.app, self.redis, shards, _fresh_millis()))

    @rule(index=account_index, amount=amounts)
    def authorize(self, index: int, amount: int) -> None:
        account = self.accounts[index]
        request_id = rid()
        decision = self.run(self.app.gate.authorize(account.account_id, request_id, amount, ""))
        assert decision.allowed == (account.balance >= amount)
        if decision.allowed:
            account.requests[request_id] = Request(amount, None, (amount, None))

    @rule(index=account_index, which=pick)
    def replay(self, index: int, which: int) -> None:
        account = self.accounts[index]
        picked = account.pick(which)
        if picked is None or picked[1].redis is None:
            return
        request_id, request = picked
        authorized = request.redis[0] if request.redis else 0
        decision = self.run(self.app.gate.authorize(account.account_id, request_id, authorized, ""))
        assert (decision.allowed, decision.replayed) == (True, True)

    @rule(index=account_index, which=pick, amount=amounts)
    def reuse_after_expiry(self, index: int, which: int, amount: int) -> None:
        """The record expires (PEXPIRE 1 ms) and the id is authorized again, at any amount:
        Redis decides afresh; the ledger keeps its first authorization (a duplicate)."""
        account = self.accounts[index]
        picked = account.pick(which)
        if picked is None:
            return
        request_id, request = picked
        if request.redis is not None:
            self.run(expire_request_record(self.app, self.redis, account.account_id, request_id))
            request.redis = None
        decision = self.run(self.app.gate.authorize(account.account_id, request_id, amount, ""))
        assert decision.allowed == (account.balance >= amount)
        assert not decision.replayed
        if decision.allowed:
            request.redis = (amount, None)

    @rule(index=account_index, which=pick, final=amounts)
    def settle(self, index: int, which: int, final: int) -> None:
        """Up or down: the ledger's first settle of the id sets its final cost."""
        account = self.accounts[index]
        picked = account.pick(which)
        if picked is None or picked[1].redis is None:
            return
        request_id, request = picked
        authorized, settled = request.redis or (0, None)
        if settled is not None and settled != final:
            try:
                self.run(self.app.gate.settle(account.account_id, request_id, final))
            except FailedPrecondition:
                return
            raise AssertionError("a settled cost changed")
        self.run(self.app.gate.settle(account.account_id, request_id, final))
        request.redis = (authorized, final)
        if request.ledger_final is None:
            request.ledger_final = final

    @rule(index=account_index, amount=st.integers(-2 * USD, 5 * USD).filter(bool))
    def credit(self, index: int, amount: int) -> None:
        """An operator's credit, or a debit (a negative credit, as a refund books)."""
        account = self.accounts[index]
        self.run(self.app.accounts.credit(account.account_id, amount, "adjust", rid()))
        account.credited += amount

    @rule(index=account_index, amount=st.integers(1, 5).map(lambda n: n * USD))
    def top_up(self, index: int, amount: int) -> None:
        """A manual top-up charged to the sandbox card: a credit with a lot of its own."""
        account = self.accounts[index]
        row = self.run(self.app.topups.manual(account.account_id, amount, rid()))
        assert row.status == "succeeded"
        account.credited += amount
        account.top_ups.append(row.top_up_id)

    @rule(index=account_index, which=pick, amount=st.integers(0, 3 * USD))
    def refund(self, index: int, which: int, amount: int) -> None:
        """P13: a refund of a top-up's unconsumed part (0: all of it). What traffic
        consumed is not refundable, so the model takes what the refund reports, and the
        invariant checks that hot balance and ledger moved by exactly that."""
        account = self.accounts[index]
        if not account.top_ups:
            return
        top_up_id = account.top_ups[which % len(account.top_ups)]
        try:
            row = self.run(self.app.refunds.refund_top_up(top_up_id, amount, "refund", rid()))
        except FailedPrecondition:  # nothing unconsumed is left
            return
        assert row.status == "succeeded", row
        assert row.refunded_micros <= (amount or row.refunded_micros)
        account.credited -= row.refunded_micros

    @rule(index=account_index)
    def reload_from_postgres(self, index: int) -> None:
        """Redis loses the account (its hash and request records); it is loaded again
        from the ledger, and its request ids are decided afresh from then on."""
        account = self.accounts[index]
        self.run(self.app.flusher.drain())
        self.run(self._forget(account))
        assert self.run(self.app.accounts.ensure_loaded(account.account_id))
        for request in account.requests.values():
            request.redis = None

    async def _forget(self, account: Account) -> None:
        keys = self.app.hot.keys
        doomed = [keys.account(account.account_id)]
        doomed += [keys.request(account.account_id, request_id) for request_id in account.requests]
        for key in doomed:  # one by one: simplest on a cluster client too
            await self.redis.delete(key)

    @invariant()
    def every_account_follows_its_own_model(self) -> None:
        if self.accounts:
            self.run(self._check())

    async def _check(self) -> None:
        await self.app.flusher.drain()
        for account in self.accounts:
            account_id = account.account_id
            hot = await self.app.hot.read_account(account_id)
            assert hot is not None
            row = await self.app.pg.get_account(account_id)
            assert row is not None
            assert (account_id, hot.balance_micros, hot.unflushed_micros) == (
                account_id,
                account.balance,
                0,
            )
            assert (account_id, row.ledger_balance_micros) == (account_id, account.balance)
            assert row.used_micros == await self.app.pg.usage_total(account_id)
            below_zero = await self.app.pool.fetch(
                "SELECT request_id, sum(amount_micros) AS cost FROM usage_events"
                " WHERE account_id = $1 GROUP BY request_id HAVING sum(amount_micros) < 0",
                account_id,
            )
            assert [tuple(r) for r in below_zero] == []


def _redis_client(app_settings: Settings) -> aioredis.Redis:
    url = app_settings.redis_url.get_secret_value()
    if CLUSTER:
        return cast(aioredis.Redis, RedisCluster.from_url(url))
    return aioredis.Redis.from_url(url)


def test_issue13_money_stays_exact_under_repeats_reuse_settles_and_reloads(
    settings: Settings,
) -> None:
    """Sync on purpose: the machine's rules run on a loop of their own (asyncio.Runner)."""
    with asyncio.Runner() as runner:
        app = runner.run(App.open(settings, migrate=False))
        redis_client = _redis_client(settings)
        try:
            runner.run(app.hot.ensure_usage_groups())

            class OnTheseServers(LedgerMachine):
                def __init__(self) -> None:
                    super().__init__(runner, app, redis_client)

            run_state_machine_as_test(OnTheseServers, settings=settings_for_the_machine)
        finally:
            runner.run(redis_client.aclose())
            runner.run(app.close())


# No shrinking: each replay costs real Redis and Postgres work, and a failing run
# prints its steps anyway. Passing, it takes about 35 s on 2 cores; on the Redis
# Cluster (a flush reads 256 streams in a pipeline) a smaller run, as long.
settings_for_the_machine = hypothesis_settings(
    max_examples=15 if CLUSTER else 80,
    stateful_step_count=20 if CLUSTER else 30,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
