"""Authorize while Redis is away: the fail mode, and the journal settled afterwards.

fail_closed: deny with code 'unavailable'. A call that had already been sent
when it timed out may still run in Redis and debit a request the proxy was
told was denied: it is journaled as a *void* of that attempt (its token, see
lua/void_attempt.lua). Once Redis answers, the void gives back what that
attempt itself wrote, unless another attempt was answered from it, and fences
the attempt so it debits nothing if it arrives later; a retry of the request
id is decided afresh. The customer never pays for it, and never gets it free.
The void journal is bounded (max_voids): the gate sends a call only when a
void of it would fit (reserve), so at the cap it answers 'unavailable' without
sending, until the journal drains; no void is ever dropped.

fail_open: allow, up to a budget per account for this outage, in this
sidecar's memory. Each allowed request is journaled as a *debit* and charged
once Redis is back, through lua/lease_report.lua: the request record makes it
count once even if the timed-out call ran after all. Bounded: past
max_requests the journal is full and requests are denied.

The journal lives in memory: a sidecar killed during an outage loses its
fail_open debits (at most budget x accounts it served; docs/reliability.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from balance_gate import metrics
from balance_gate.constants import DenyCode
from balance_gate.errors import FailedPrecondition, Unavailable
from balance_gate.redis_store import LeasedUse, RedisStore, VoidResult

log = logging.getLogger(__name__)

FailMode = Literal["fail_closed", "fail_open"]

# Debits replayed per script call: one call stays well under Redis's limits.
_REPLAY_CHUNK = 200


@dataclass(frozen=True, slots=True)
class OutageDecision:
    allowed: bool
    code: str
    replayed: bool = False


@dataclass(slots=True)
class _Owed:
    spent_micros: int = 0
    debits: dict[str, LeasedUse] = field(default_factory=dict)  # request_id -> use
    voids: dict[str, str] = field(default_factory=dict)  # attempt token -> request_id


_DENIED = OutageDecision(False, DenyCode.UNAVAILABLE)


class OutageJournal:
    def __init__(
        self,
        hot: RedisStore,
        mode: FailMode,
        budget_micros: int,
        max_requests: int,
        holder: str,
        exists: Callable[[str], Awaitable[bool]],
        max_voids: int = 100_000,
    ) -> None:
        self._hot = hot
        # Loads an account into Redis; False: there is no such account. A debit of
        # an unknown account must never reach the usage stream (Postgres would
        # refuse it, and the flusher with it).
        self._exists = exists
        self._mode = mode
        self._budget = budget_micros
        self._max_requests = max_requests
        self._holder = holder  # never holds a lease: its reports are paid from the balance
        self._owed: dict[str, _Owed] = {}
        self._entries = 0
        self._max_voids = max_voids
        self._in_flight = 0  # fail_closed: calls sent or queued, each may become a void

    @property
    def entries(self) -> int:
        return self._entries

    def reserve(self) -> bool:
        """May an Authorize call be sent? fail_closed: only if its void would fit.

        Every call reserved is released (release) when it ends, before a void of
        it is journaled: entries + calls in flight never pass max_voids.
        """
        if self._mode != "fail_closed":
            return True
        if self._entries + self._in_flight >= self._max_voids:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        if self._mode == "fail_closed":
            self._in_flight -= 1

    def decide(
        self,
        account_id: str,
        request_id: str,
        amount_micros: int,
        capability: str,
        *,
        sent: bool,
        attempt: str = "",
    ) -> OutageDecision:
        """Answer one Authorize that Redis could not; `sent`: the call may have run.

        attempt: the token of the call that was sent (its void names it).
        """
        if self._mode == "fail_closed":
            if sent:
                if not attempt:
                    raise ValueError("a sent Authorize call must carry its attempt token")
                voids = self._owed.setdefault(account_id, _Owed()).voids
                if attempt not in voids:
                    voids[attempt] = request_id
                    self._count(1)
            return self._denied()
        owed = self._owed.setdefault(account_id, _Owed())
        known = owed.debits.get(request_id)
        if known is not None:  # a retry during the outage: the same answer, charged once
            if known.amount_micros != amount_micros:
                raise FailedPrecondition(
                    "request_id: already authorized with a different amount_micros"
                )
            return OutageDecision(True, "", replayed=True)
        if owed.spent_micros + amount_micros > self._budget or self._entries >= self._max_requests:
            return self._denied()
        owed.debits[request_id] = LeasedUse(request_id, amount_micros, capability)
        owed.spent_micros += amount_micros
        self._count(1)
        metrics.OUTAGE_DECISIONS.labels("allowed").inc()
        return OutageDecision(True, "")

    @staticmethod
    def _denied() -> OutageDecision:
        metrics.OUTAGE_DECISIONS.labels("denied").inc()
        return _DENIED

    def _count(self, delta: int) -> None:
        self._entries += delta
        metrics.OUTAGE_JOURNAL.set(self._entries)

    async def replay(self) -> None:
        """Settle the journal in Redis; an entry leaves it only once Redis confirmed it.

        Raises on a Redis error: the breaker stays open and the next probe
        replays what is left. Replaying twice is harmless: request records
        de-duplicate debits, and a void settles a request at most once.
        Requests decided while this runs (the breaker is still open) are
        settled by the same loops.
        """
        settled = 0
        while self._entries:
            settled += await self._replay_once()
        if settled:
            log.warning("outage journal: %d requests settled in Redis", settled)

    async def _replay_once(self) -> int:
        settled = 0
        for account_id, owed in list(self._owed.items()):
            if owed.debits and not await self._exists(account_id):
                log.warning(
                    "outage journal: %d requests of unknown account %r dropped",
                    len(owed.debits),
                    account_id,
                )
                self._count(-len(owed.debits))
                owed.debits.clear()
            while owed.debits:
                chunk = list(owed.debits.values())[:_REPLAY_CHUNK]
                await self._hot.lease_report(self._holder, account_id, chunk, 1, return_all=False)
                for use in chunk:
                    del owed.debits[use.request_id]
                self._count(-len(chunk))
                settled += len(chunk)
                metrics.OUTAGE_REPLAYED.labels("debit").inc(len(chunk))
            while owed.voids:
                attempt, request_id = next(iter(owed.voids.items()))
                await self._void(account_id, request_id, attempt)
                del owed.voids[attempt]
                self._count(-1)
                settled += 1
                metrics.OUTAGE_REPLAYED.labels("void").inc()
        return settled

    def end_outage(self) -> None:
        """Redis is back and the journal settled: the next outage starts new budgets."""
        if self._entries == 0:
            self._owed.clear()

    async def _void(self, account_id: str, request_id: str, attempt: str) -> None:
        """Make sure an attempt the proxy was told was denied costs nothing, and that a
        retry of its request id is decided afresh (lua/void_attempt.lua)."""
        result = await self._hot.void_attempt(account_id, request_id, attempt)
        if result == VoidResult.NOT_LOADED:
            if not await self._exists(account_id):
                return  # no such account: nothing was debited
            result = await self._hot.void_attempt(account_id, request_id, attempt)
        if result == VoidResult.NOT_LOADED:
            raise Unavailable(f"void of {account_id!r}/{request_id!r}: account not loaded")
