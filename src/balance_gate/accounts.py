"""Accounts: creation, operator credits, status, and loading hot state from the ledger.

Every change of money goes Postgres first, then Redis, under the shard's shared
lock; a load (or reconcile) reads Postgres and writes Redis under the shard's
exclusive lock. See postgres_store.PostgresStore.shard_lock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from balance_gate import metrics, validation
from balance_gate.constants import MAX_CREDIT_VALIDITY_DAYS, MAX_SAFE_MICROS, ScriptCode
from balance_gate.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from balance_gate.keys import shard_of
from balance_gate.postgres_store import AccountRow, Connection, CreditRow, PostgresStore
from balance_gate.redis_store import FieldsWritten, RedisStore

log = logging.getLogger(__name__)

STATUSES = ("active", "disabled")


@dataclass(frozen=True, slots=True)
class AccountView:
    """An account as operators see it: the ledger row and the hot balance."""

    account_id: str
    currency: str
    status: str
    balance_micros: int
    credited_micros: int
    used_micros: int
    unflushed_usage_micros: int
    created_at: dt.datetime

    @property
    def credit_used_micros(self) -> int:
        """O3, C1: how far the balance is below zero, paid by the next top-up first."""
        return max(0, -self.balance_micros)


class NotFoundCache:
    """Remembers unknown account ids briefly, so a flood of them cannot reach Postgres.

    Bounded and least-recently-used: when full, the entry unused the longest is
    dropped, never the whole cache. A hit does not extend an entry's TTL, so an
    account created meanwhile shows up after at most ttl_s.
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()  # oldest use first

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, account_id: str) -> bool:
        expiry = self._expiry.get(account_id)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[account_id]
            return False
        self._expiry.move_to_end(account_id)
        return True

    def add(self, account_id: str) -> None:
        if self._ttl_s <= 0 or self._max_entries <= 0:
            return
        now = self._clock()
        self._expiry[account_id] = now + self._ttl_s
        self._expiry.move_to_end(account_id)
        self._drop_expired_from_the_front(now)
        while len(self._expiry) > self._max_entries:
            self._expiry.popitem(last=False)  # the least recently used

    def discard(self, account_id: str) -> None:
        self._expiry.pop(account_id, None)

    def _drop_expired_from_the_front(self, now: float) -> None:
        """Expired entries among the least recently used go at once (amortized O(1))."""
        while self._expiry:
            oldest, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[oldest]


class Accounts:
    def __init__(
        self,
        pg: PostgresStore,
        hot: RedisStore,
        not_found_ttl_s: float,
        *,
        not_found_max_entries: int = 100_000,
        load_slots: int = 4,
        load_wait_s: float = 1.0,
        release_lease: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._pg = pg
        self._hot = hot
        # This sidecar's own lease on an account it cuts goes back at once (leases.py).
        self._release_lease = release_lease
        self._not_found = NotFoundCache(not_found_ttl_s, not_found_max_entries)
        self._loading: dict[str, asyncio.Future[bool]] = {}
        # Cold loads hold pool connections: bounded, so a flood of unknown ids always
        # leaves connections to the flusher, credits and top-ups.
        self._load_slots = asyncio.Semaphore(load_slots)
        self._load_wait_s = load_wait_s
        self.loads_in_progress = 0  # loads holding a slot now

    # --- loading ------------------------------------------------------------

    async def ensure_loaded(self, account_id: str) -> bool:
        """Make sure the account is in Redis; False when it does not exist.

        Concurrent callers in this process share one load; across processes
        the shard's exclusive lock and the script's "only if missing" make the
        load happen exactly once. Unavailable when no load slot frees up within
        load_wait_s (a flood of cold or unknown ids): the caller may retry.
        """
        if account_id in self._not_found:
            return False
        pending = self._loading.get(account_id)
        if pending is None:
            pending = asyncio.ensure_future(self._load_in_a_slot(account_id))
            self._loading[account_id] = pending
            pending.add_done_callback(lambda _: self._loading.pop(account_id, None))
        # A cancelled caller must not cancel the load that others wait on.
        return await asyncio.shield(pending)

    async def _load_in_a_slot(self, account_id: str) -> bool:
        try:
            async with asyncio.timeout(self._load_wait_s):
                await self._load_slots.acquire()
        except TimeoutError:
            metrics.ACCOUNT_LOADS.labels("busy").inc()
            raise Unavailable("too many account loads at once; retry") from None
        self.loads_in_progress += 1
        try:
            return await self._load(account_id)
        finally:
            self.loads_in_progress -= 1
            self._load_slots.release()

    async def _load(self, account_id: str) -> bool:
        # A plain indexed read first: an unknown id never waits for, or holds,
        # the shard's exclusive lock that flushes and credits queue behind.
        if not await self._pg.account_exists(account_id):
            self._not_found.add(account_id)
            metrics.ACCOUNT_LOADS.labels("not_found").inc()
            return False
        async with self._pg.shard_lock([shard_of(account_id)], exclusive=True) as conn:
            snapshot = await self._pg.load_snapshot(conn, account_id)
            if snapshot is None:  # accounts are never deleted; kept for safety
                self._not_found.add(account_id)
                metrics.ACCOUNT_LOADS.labels("not_found").inc()
                return False
            result = await self._hot.sync_account(
                account_id,
                reconcile=False,
                ledger_balance_micros=snapshot.ledger_balance_micros,
                status=snapshot.status,
                unapplied_credit_ids=snapshot.unapplied_credit_ids,
                auto_top_up=snapshot.auto_top_up,
                line_fields=snapshot.line_fields,
            )
        loaded = result.code != ScriptCode.ALREADY_LOADED
        metrics.ACCOUNT_LOADS.labels("loaded" if loaded else "already_loaded").inc()
        return True

    async def reconcile_locked(self, conn: Connection, account_id: str) -> int | None:
        """Bring the hot balance in line with the ledger; return the correction.

        The caller holds the account's shard lock exclusively and has already
        recorded every usage event that was read but not acknowledged.
        None when the account does not exist.
        """
        snapshot = await self._pg.load_snapshot(conn, account_id)
        if snapshot is None:
            return None
        result = await self._hot.sync_account(
            account_id,
            reconcile=True,
            ledger_balance_micros=snapshot.ledger_balance_micros,
            status=snapshot.status,
            unapplied_credit_ids=snapshot.unapplied_credit_ids,
            auto_top_up=snapshot.auto_top_up,
            line_fields=snapshot.line_fields,
        )
        return result.value

    # --- operator actions ---------------------------------------------------

    async def create(self, account_id: str, currency: str) -> AccountView:
        validation.check_id("account_id", account_id)
        currency = validation.normalize_currency(currency)
        await self._pg.create_account(account_id, currency)
        self._not_found.discard(account_id)
        return await self.get(account_id)

    async def get(self, account_id: str) -> AccountView:
        validation.check_id("account_id", account_id)
        hot = await self._hot.read_account(account_id)
        if hot is None:  # load only when missing: a load locks the whole shard
            if not await self.ensure_loaded(account_id):
                raise NotFound(f"account {account_id!r} not found")
            hot = await self._hot.read_account(account_id)
        row = await self._pg.get_account(account_id)
        if row is None:
            raise NotFound(f"account {account_id!r} not found")
        if hot is None:
            raise Unavailable(f"account {account_id!r} could not be loaded into Redis")
        return _view(row, hot.balance_micros, hot.unflushed_micros)

    async def credit(
        self, account_id: str, amount_micros: int, reason: str, idempotency_key: str
    ) -> AccountView:
        validation.check_id("account_id", account_id)
        validation.check_credit_amount("amount_micros", amount_micros)
        validation.check_reason(reason)
        validation.check_client_key("idempotency_key", idempotency_key)
        # Shielded: a caller that hangs up must not stop a credit between stores.
        await asyncio.shield(self._credit(account_id, amount_micros, reason, idempotency_key))
        return await self.get(account_id)

    async def _credit(
        self, account_id: str, amount_micros: int, reason: str, idempotency_key: str
    ) -> None:
        async with self._pg.shard_lock([shard_of(account_id)], exclusive=False) as conn:
            credit = await self._pg.record_credit(
                conn, account_id, amount_micros, reason, idempotency_key, MAX_SAFE_MICROS
            )
            if not credit.hot_applied:
                await self.apply_recorded_credit(conn, credit)

    async def apply_recorded_credit(self, conn: Connection, credit: CreditRow) -> bool:
        """Apply a recorded credit to Redis once; True when it was applied just now."""
        result = await self._hot.apply_credit(
            credit.account_id, credit.credit_id, credit.amount_micros
        )
        if result.code == ScriptCode.OUT_OF_RANGE:
            # Postgres bounds the ledger balance, so the hot balance must have
            # drifted from it; a rebuild reconciles both and counts this credit.
            log.error("credit %d would take the hot balance out of range", credit.credit_id)
            raise FailedPrecondition(
                f"credit {credit.credit_id} is recorded in the ledger, but the hot balance is"
                " out of range: run `balance-gate rebuild`"
            )
        # OK, ALREADY_APPLIED and NOT_LOADED (a later load counts it) all mean
        # the credit is accounted for in Redis.
        await self._pg.mark_credit_applied(conn, credit.credit_id)
        return result.code == ScriptCode.OK

    async def set_credit_validity(self, account_id: str, days: int) -> None:
        """O2: how long lots opened from now on stay valid; 0 = they never expire."""
        validation.check_id("account_id", account_id)
        if not 0 <= days <= MAX_CREDIT_VALIDITY_DAYS:
            raise InvalidArgument("days", f"must be between 0 and {MAX_CREDIT_VALIDITY_DAYS}")
        if not await self._pg.set_credit_validity(account_id, days):
            raise NotFound(f"account {account_id!r} not found")

    async def set_status(self, account_id: str, status: str) -> AccountView:
        validation.check_id("account_id", account_id)
        if status not in STATUSES:
            raise InvalidArgument("status", f"must be one of {', '.join(STATUSES)}")
        # Shielded like credits: a disable must reach Redis once Postgres has it.
        await asyncio.shield(self._set_status(account_id, status))
        return await self.get(account_id)

    async def _set_status(self, account_id: str, status: str) -> None:
        async with self._pg.shard_lock([shard_of(account_id)], exclusive=False) as conn:
            await self._pg.set_status(conn, account_id, status)
            written = await self._hot.set_status(account_id, status)
        # The write recalled the leases; other holders return theirs at their next report.
        if written == FieldsWritten.RECALLED and self._release_lease is not None:
            await self._release_lease(account_id)

    async def sweep_unapplied_credits(self, older_than_s: float = 5.0, limit: int = 500) -> int:
        """Settle credits a crash left between Postgres and Redis; return how many.

        One credit that cannot be applied is logged and skipped, so it never
        blocks the others.
        """
        settled = 0
        for credit in await self._pg.unapplied_credits(older_than_s, limit):
            try:
                async with self._pg.shard_lock(
                    [shard_of(credit.account_id)], exclusive=False
                ) as conn:
                    applied_now = await self.apply_recorded_credit(conn, credit)
            except FailedPrecondition:
                continue
            settled += 1
            if applied_now:
                metrics.CREDITS_REAPPLIED.inc()
                log.warning("applied credit %d a crash had left out of Redis", credit.credit_id)
        return settled


def _view(row: AccountRow, balance_micros: int, unflushed_micros: int) -> AccountView:
    return AccountView(
        account_id=row.account_id,
        currency=row.currency,
        status=row.status,
        balance_micros=balance_micros,
        credited_micros=row.credited_micros,
        used_micros=row.used_micros,
        unflushed_usage_micros=unflushed_micros,
        created_at=row.created_at,
    )
