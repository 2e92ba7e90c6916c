"""The hot path: Authorize and Settle. One Redis script call per decision.

A denial is a normal answer (P1: insufficient_balance), not an error. Errors
are raised as balance_gate.errors and mapped to gRPC codes by grpc_api.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from balance_gate import metrics
from balance_gate.accounts import Accounts
from balance_gate.breaker import CircuitBreaker
from balance_gate.constants import DenyCode, ScriptCode
from balance_gate.errors import FailedPrecondition, NotFound, Unavailable
from balance_gate.leases import LeaseManager
from balance_gate.outage import OutageJournal
from balance_gate.prefixes import NO_ACCOUNTS, AccountPrefixes
from balance_gate.redis_store import HotUnavailable, RedisStore, ScriptResult
from balance_gate.validation import (
    check_capability,
    check_id,
    check_request_amount,
    normalize_capability,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    code: str  # "" when allowed, else a DenyCode (in shadow mode: the would-be denial)
    balance_micros: int
    replayed: bool = False
    low_balance: bool = False  # allowed, under the warning level, no top-up coming
    shadow: bool = False  # shadow mode allowed what the gate would have denied


@dataclass(frozen=True, slots=True)
class Settlement:
    balance_micros: int
    delta_micros: int
    replayed: bool


_DENIALS = {
    ScriptCode.INSUFFICIENT_BALANCE: DenyCode.INSUFFICIENT_BALANCE,
    ScriptCode.ACCOUNT_DISABLED: DenyCode.ACCOUNT_DISABLED,
    ScriptCode.CAPABILITY_BLOCKED: DenyCode.CAPABILITY_BLOCKED,
    ScriptCode.RATE_LIMITED: DenyCode.RATE_LIMITED,
    ScriptCode.BACKLOG_FULL: DenyCode.UNAVAILABLE,
    ScriptCode.VOIDED: DenyCode.UNAVAILABLE,  # only a caller that had given up sees it
}


class AttemptTokens:
    """A token per Authorize call sent to Redis, unique across sidecars: a random
    prefix per process and a counter, in hex (lua/lib/records.lua relies on that)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(5)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_DECISION_COUNTERS = {
    result: metrics.AUTHORIZE_DECISIONS.labels(result)
    for result in ("allowed", *_DENIALS.values(), DenyCode.ACCOUNT_NOT_FOUND)
}


class Gate:
    def __init__(
        self,
        hot: RedisStore,
        accounts: Accounts,
        max_request_micros: int,
        breaker: CircuitBreaker,
        outage: OutageJournal,
        leases: LeaseManager | None = None,
        shadow: AccountPrefixes = NO_ACCOUNTS,
        recall_wait_s: float = 0.25,
        recall_poll_s: float = 0.02,
    ) -> None:
        self._hot = hot
        self._breaker = breaker
        self._outage = outage
        breaker.on_recovery(self._recover)
        self._accounts = accounts
        self._max_request_micros = max_request_micros
        self._leases = leases
        self._shadow = shadow
        self._recall_wait_s = recall_wait_s
        self._recall_poll_s = recall_poll_s
        self._attempts = AttemptTokens()

    async def authorize(
        self, account_id: str, request_id: str, amount_micros: int, capability: str
    ) -> Decision:
        decision = await self._decide(account_id, request_id, amount_micros, capability)
        return self._shadowed(account_id, decision)  # counted above as what it was

    async def _decide(
        self, account_id: str, request_id: str, amount_micros: int, capability: str
    ) -> Decision:
        started = time.perf_counter()
        check_id("account_id", account_id)
        check_id("request_id", request_id)
        check_request_amount("amount_micros", amount_micros, self._max_request_micros)
        check_capability(capability)
        # C4: one spelling for the lease, the script, the outage journal and the ledger.
        capability = normalize_capability(capability)

        leases = self._leases
        if leases is not None:
            local = leases.try_authorize(account_id, request_id, amount_micros, capability)
            if local is not None:
                return self._decided(started, Decision(True, "", local[0], local[1]))

        try:
            result = await self._authorize(account_id, request_id, amount_micros, capability)
            if result.code == ScriptCode.NOT_LOADED:
                if not await self._accounts.ensure_loaded(account_id):
                    return self._decided(started, Decision(False, DenyCode.ACCOUNT_NOT_FOUND, 0))
                result = await self._authorize(account_id, request_id, amount_micros, capability)
            if result.code == ScriptCode.LEASED:
                result = await self._after_recall(account_id, request_id, amount_micros, capability)
        except HotUnavailable as exc:
            answer = self._outage.decide(
                account_id,
                request_id,
                amount_micros,
                capability,
                sent=exc.sent,
                attempt=exc.attempt,
            )
            if self._outage.entries:
                self._breaker.owe()
            return self._decided(started, Decision(answer.allowed, answer.code, 0, answer.replayed))
        decision = self._decision(result)
        if leases is not None and decision.allowed:
            leases.observe(account_id, request_id, amount_micros, replayed=decision.replayed)
        return self._decided(started, decision)

    async def _after_recall(
        self, account_id: str, request_id: str, amount_micros: int, capability: str
    ) -> ScriptResult:
        """Only leased money could pay: wait for the holders to give it back, then ask again.

        Live holders return their leases at their next report; if the money is
        still out after recall_wait_s, its holders are dead or stalled and it
        comes back when their leases expire: until then the request is denied.
        """
        if self._leases is not None:
            await self._leases.release(account_id)  # our own lease first
        deadline = time.monotonic() + self._recall_wait_s
        while True:
            result = await self._authorize(account_id, request_id, amount_micros, capability)
            if result.code != ScriptCode.LEASED:
                return result
            if time.monotonic() >= deadline:
                return ScriptResult(ScriptCode.INSUFFICIENT_BALANCE, result.balance_micros)
            await asyncio.sleep(self._recall_poll_s)

    async def _authorize(
        self, account_id: str, request_id: str, amount_micros: int, capability: str
    ) -> ScriptResult:
        """One authorize script call through the circuit breaker (HotUnavailable if not).

        Each call is an attempt with its own token, which a void of it names. A call
        is sent only if the outage journal could hold its void (fail_closed): when
        it is full, the journal's settling is started and the call is not sent.
        """
        if not self._outage.reserve():
            self._breaker.recover_now()
            raise HotUnavailable("outage journal full: settling it first", pipeline=None)
        attempt = self._attempts.next()
        try:
            return await self._guarded(
                lambda: self._hot.authorize(
                    account_id, request_id, amount_micros, capability, attempt
                )
            )
        except HotUnavailable as exc:
            exc.attempt = attempt
            raise
        finally:
            self._outage.release()  # before the caller journals a void of it

    async def _guarded(self, send: Callable[[], Awaitable[ScriptResult]]) -> ScriptResult:
        """Send a script call unless the circuit is open, and tell the breaker how it went."""
        if not self._breaker.admit():
            raise HotUnavailable("redis circuit open", pipeline=None)
        try:
            result = await send()
        except HotUnavailable as exc:
            self._breaker.failed(exc.pipeline)
            raise
        self._breaker.answered()
        return result

    async def _recover(self) -> None:
        """Before the circuit closes: settle what was decided without Redis."""
        await self._outage.replay()
        self._outage.end_outage()

    @property
    def outage_settled(self) -> bool:
        """Redis answers and nothing decided without it is left to settle."""
        return not self._breaker.is_open and self._outage.entries == 0

    async def settle_outage(self) -> None:
        """At shutdown: one last try to settle the outage journal in Redis."""
        await self._breaker.wait_recovered()
        if not self._outage.entries:
            return
        try:
            await self._recover()
        except (RedisError, OSError):
            log.error(
                "stopping with %d requests decided without Redis left unsettled",
                self._outage.entries,
            )

    async def wait_recovered(self) -> None:
        await self._breaker.wait_recovered()

    @staticmethod
    def _decision(result: ScriptResult) -> Decision:
        if result.code == ScriptCode.OK:
            return Decision(
                True, "", result.balance_micros, result.replayed, low_balance=result.low_balance
            )
        if result.code == ScriptCode.AMOUNT_MISMATCH:
            raise FailedPrecondition(
                "request_id: already authorized with a different amount_micros"
            )
        denial = _DENIALS.get(result.code)
        if denial is None:  # NOT_LOADED twice: the account vanished again under us
            raise Unavailable("account state is being rebuilt; retry")
        return Decision(False, denial, result.balance_micros)

    def _decided(self, started: float, decision: Decision) -> Decision:
        _DECISION_COUNTERS["allowed" if decision.allowed else decision.code].inc()
        metrics.AUTHORIZE_SECONDS.observe(time.perf_counter() - started)
        return decision

    def _shadowed(self, account_id: str, decision: Decision) -> Decision:
        """Shadow mode: a denial is counted as one (above), then answered allowed."""
        if decision.allowed or not self._shadow or not self._shadow.covers(account_id):
            return decision
        metrics.SHADOW_ALLOWED.labels(decision.code).inc()
        return Decision(True, decision.code, decision.balance_micros, shadow=True)

    async def settle(self, account_id: str, request_id: str, amount_micros: int) -> Settlement:
        check_id("account_id", account_id)
        check_id("request_id", request_id)
        check_request_amount("amount_micros", amount_micros, self._max_request_micros)

        if self._leases is not None:
            await self._leases.flush_account(account_id)  # its request record must exist
        result = await self._settle(account_id, request_id, amount_micros)
        if result.code == ScriptCode.NOT_LOADED:
            if not await self._accounts.ensure_loaded(account_id):
                raise NotFound(f"account {account_id!r} not found")
            result = await self._settle(account_id, request_id, amount_micros)

        if result.code == ScriptCode.OK:
            metrics.SETTLES.labels("replayed" if result.replayed else "settled").inc()
            return Settlement(result.balance_micros, result.value, result.replayed)
        if result.code == ScriptCode.REQUEST_NOT_FOUND:
            metrics.SETTLES.labels("request_not_found").inc()
            raise NotFound(
                f"request_id {request_id!r}: no allowed Authorize to settle "
                "(never authorized, denied, voided after a timeout, or older than the request TTL)"
            )
        if result.code == ScriptCode.ALREADY_SETTLED:
            metrics.SETTLES.labels("already_settled").inc()
            raise FailedPrecondition(
                f"request_id {request_id!r}: already settled at {result.value} micros;"
                " a settled cost is final"
            )
        raise Unavailable("account state is being rebuilt; retry")

    async def _settle(self, account_id: str, request_id: str, amount_micros: int) -> ScriptResult:
        """A settle script call; Redis away: UNAVAILABLE, the proxy retries (idempotent)."""
        try:
            return await self._guarded(
                lambda: self._hot.settle(account_id, request_id, amount_micros)
            )
        except HotUnavailable as exc:
            raise Unavailable(f"{exc}; retry") from exc
