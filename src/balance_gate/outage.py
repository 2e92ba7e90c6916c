"""Authorize while Redis is away: the fail mode, and the journal settled afterwards.

fail_closed: deny with code 'unavailable'. A call that had already been sent
when it timed out may still run in Redis and debit a request the proxy was
told was denied: it is journaled as a *void*: once Redis is back, it is settled
to 0 if it ran, or fenced (recorded as settled at 0) so it never debits if it
arrives later. The customer never pays for it.

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
from balance_gate.constants import DenyCode, ScriptCode
from balance_gate.errors import FailedPrecondition
from balance_gate.redis_store import LeasedUse, RedisStore

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
    voids: dict[str, int] = field(default_factory=dict)  # request_id -> amount sent


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

    @property
    def entries(self) -> int:
        return self._entries

    def decide(
        self, account_id: str, request_id: str, amount_micros: int, capability: str, *, sent: bool
    ) -> OutageDecision:
        """Answer one Authorize that Redis could not; `sent`: the call may have run."""
        if self._mode == "fail_closed":
            if sent:
                voids = self._owed.setdefault(account_id, _Owed()).voids
                if request_id not in voids:
                    voids[request_id] = amount_micros
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
                request_id, amount = next(iter(owed.voids.items()))
                await self._void(account_id, request_id, amount)
                del owed.voids[request_id]
                self._count(-1)
                settled += 1
                metrics.OUTAGE_REPLAYED.labels("void").inc()
        return settled

    def end_outage(self) -> None:
        """Redis is back and the journal settled: the next outage starts new budgets."""
        if self._entries == 0:
            self._owed.clear()

    async def _void(self, account_id: str, request_id: str, amount_micros: int) -> None:
        """Make sure a request the proxy was told was denied costs nothing.

        Not run yet (it may still arrive late): fence it with a record settled
        at 0, so it never debits. Ran: give the debit back (a settle to 0).
        """
        if await self._hot.fence_request(account_id, request_id, amount_micros):
            return
        record = await self._hot.request_record(account_id, request_id)
        if record != str(amount_micros):  # already settled: nothing to undo
            return
        result = await self._hot.settle(account_id, request_id, 0)
        if result.code != ScriptCode.OK:
            log.warning("void of %r/%r: script code %d", account_id, request_id, result.code)
