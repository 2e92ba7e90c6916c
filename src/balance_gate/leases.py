"""Balance leasing: authorize a hot account from memory, without a Redis round trip.

The idea is RFC 4006's granted units. A sidecar that sees an account busy
takes a lease: one atomic script (lua/lease_take.lua) moves part of the
balance into the sidecar's lease, with an expiry. Then it allows requests
from the lease in memory and reports them in batches every
`lease_report_interval_ms` (lua/lease_report.lua), which records each
request once across all sidecars, debits the lease and renews it.

What stays exact (docs/leasing.md):
- balance + all leases never goes below the floor: a sidecar allows only
  what its lease still holds, and grants are at most half the free balance,
  so leases shrink as the balance falls;
- `insufficient_balance` is not answered while a live sidecar's lease could
  pay: the normal path then answers LEASED and sets a recall; holders see it
  in their next report and return their leases; the asking sidecar waits up
  to `lease_recall_wait_ms` and asks again. A dead sidecar's lease comes back
  when it expires;
- a request is charged once: its request record is written when it is
  reported, and a request some other path decided first is not charged again
  (its amount goes back into the lease).

- a replay is answered as the Redis path answers it, for every request id
  this sidecar decided recently on a covered account, on a lease or on the
  normal path, whatever lease came and went since: the same amount is
  `replayed`, another amount FAILED_PRECONDITION (issue 12). One memory per
  sidecar holds them, bounded (_RECENT_IDS, oldest forgotten first).

What leasing gives up: a request decided on another sidecar (or forgotten
here) and retried on a lease is allowed from it: charged once (the report
finds the record), but not marked replayed, and a retry with another amount
is not refused; and a sidecar killed with -9 loses the usage it had not
reported yet (at most one report interval of that account's traffic on that
sidecar). Off unless `lease_accounts` names the account.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from balance_gate import metrics
from balance_gate.errors import FailedPrecondition
from balance_gate.redis_store import LeasedUse, LeaseReport, RedisStore

log = logging.getLogger(__name__)

_RECENT_IDS = 65_536  # request ids a sidecar remembers for local replays (all accounts)
_REPORT_EARLY_AT = 256  # pending uses that make a report go out before its interval
_TAKE_COOLDOWN_S = 1.0  # after a refused grant, do not ask again this soon
_MAX_COOLDOWNS = 10_000  # accounts remembered as refused; past it, the oldest go first
_MAX_TRACKED_ACCOUNTS = 100_000
_RESIZE_EVERY_S = 0.5  # how often a lease's target follows the measured spend
_RECALL_POLL_S = 0.1  # how often leases with nothing to report look for a recall


@dataclass(frozen=True)
class LeaseConfig:
    accounts: tuple[str, ...]  # account id prefixes; "*" is every account
    min_rate_per_s: int
    horizon_s: float
    ttl_ms: int
    report_interval_s: float
    idle_s: float

    def covers(self, account_id: str) -> bool:
        return any(p == "*" or account_id.startswith(p) for p in self.accounts)


@dataclass
class Lease:
    account_id: str
    remaining: int = 0  # micros this sidecar may still allow
    target: int = 0  # size we aim to hold: about horizon_s of this account's spend
    smallest: int = 1  # the smallest grant worth asking for
    spent_since: float = 0.0  # when the spend below started being counted
    spent: int = 0  # micros allowed from the lease since spent_since
    usable_until: float = 0.0  # local clock; well before Redis's expiry
    renew_at: float = 0.0
    balance_seen: int = 0  # balance + leased in the last reply
    # The credit line's stop-loss (C4) at the last grant: sl_at and "|cap|cap|".
    stop_at: int | None = None
    stop_caps: str = ""
    pending: list[LeasedUse] = field(default_factory=list)
    pending_micros: int = 0
    last_used: float = 0.0
    taking: bool = False  # a grant is asked for (or queued behind the lock)
    closing: bool = False  # released: no local decision, no new grant
    # One Redis operation at a time per lease: grants, reports and the final
    # return never overtake each other.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Rate:
    started: float
    count: int = 0
    micros: int = 0


class LeaseManager:
    def __init__(
        self,
        hot: RedisStore,
        config: LeaseConfig,
        holder: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hot = hot
        self.config = config
        self.holder = holder
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._rates: dict[str, _Rate] = {}
        self._cooldown: dict[str, float] = {}  # account -> no grant asked before; bounded
        # (account, request id) -> amount of recent allowed decisions on covered accounts.
        self._decided: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._report_now = asyncio.Event()
        self._closed = False
        self._rounds = 0
        self._recall_poll_every = max(1, round(_RECALL_POLL_S / config.report_interval_s))

    # --- the hot path: no await -----------------------------------------------

    def try_authorize(
        self, account_id: str, request_id: str, amount_micros: int, capability: str
    ) -> tuple[int, bool] | None:
        """(balance, replayed) when the lease decides; None: ask Redis."""
        lease = self._leases.get(account_id)
        if lease is None:
            return None
        now = self._clock()
        if now >= lease.usable_until:
            return None
        prior = self._decided.get((account_id, request_id))
        if prior is not None:
            if prior != amount_micros:
                raise FailedPrecondition(
                    "request_id: already authorized with a different amount_micros"
                )
            return lease.balance_seen - lease.pending_micros, True
        if self._stop_loss_may_apply(lease, amount_micros, capability):
            return None
        if amount_micros > lease.remaining:
            self._refill(lease)
            return None
        lease.remaining -= amount_micros
        lease.spent += amount_micros
        lease.pending.append(LeasedUse(request_id, amount_micros, capability))
        lease.pending_micros += amount_micros
        self._remember(account_id, request_id, amount_micros)
        lease.last_used = now
        if lease.remaining < lease.target // 2:
            self._refill(lease)
        if len(lease.pending) >= _REPORT_EARLY_AT:
            self._report_now.set()
        metrics.LEASED_AUTHORIZE.inc()
        return lease.balance_seen - lease.pending_micros, False

    @staticmethod
    def _stop_loss_may_apply(lease: Lease, amount_micros: int, capability: str) -> bool:
        """C4: what the stop-loss could refuse is left to authorize.lua, which sees the
        balance of every sidecar: a high-cost (or unnamed) capability on a line that
        names some, and any request this lease's view puts at or past the stop point
        (the rate cap). `capability` is normalized (gate.py)."""
        if lease.stop_caps and (not capability or f"|{capability}|" in lease.stop_caps):
            return True
        after = lease.balance_seen - lease.pending_micros - amount_micros
        return lease.stop_at is not None and after <= lease.stop_at

    def observe(
        self, account_id: str, request_id: str, amount_micros: int, *, replayed: bool = False
    ) -> None:
        """An allowed answer on the normal path: remembered for the leased path's replays;
        and, a new debit, counted: a busy covered account gets a lease."""
        if self._closed or not self.config.covers(account_id):
            return
        self._remember(account_id, request_id, amount_micros)
        if replayed or account_id in self._leases:
            return
        now = self._clock()
        rate = self._rates.get(account_id)
        if rate is None:
            if len(self._rates) >= _MAX_TRACKED_ACCOUNTS:
                self._rates.clear()
            rate = self._rates[account_id] = _Rate(now)
        rate.count += 1
        rate.micros += amount_micros
        elapsed = now - rate.started
        if elapsed < 1.0:
            return
        del self._rates[account_id]
        if rate.count / elapsed < self.config.min_rate_per_s:
            return
        if now < self._cooldown.get(account_id, 0.0):
            return
        self._cooldown.pop(account_id, None)
        want = int(rate.micros / elapsed * self.config.horizon_s)
        smallest = max(1, 4 * rate.micros // rate.count)
        lease = self._lease_for(account_id, max(want, smallest))
        lease.smallest = smallest
        self._refill(lease, smallest)

    def _remember(self, account_id: str, request_id: str, amount_micros: int) -> None:
        decided = self._decided
        decided[(account_id, request_id)] = amount_micros
        if len(decided) > _RECENT_IDS:
            decided.popitem(last=False)  # O(1); a dict's first key is not

    def _cool_down(self, account_id: str, until: float) -> None:
        """No grant is asked for this account before `until`. Bounded: expired entries
        go first, then the oldest (forgetting one only lets a grant be asked sooner)."""
        cooldown = self._cooldown
        cooldown.pop(account_id, None)  # re-inserted last: the dict stays in time order
        cooldown[account_id] = until
        if len(cooldown) <= _MAX_COOLDOWNS:
            return
        now = self._clock()
        while cooldown:
            oldest, ends = next(iter(cooldown.items()))
            if ends > now and len(cooldown) <= _MAX_COOLDOWNS:
                break
            del cooldown[oldest]

    @property
    def cooldowns(self) -> int:
        """Accounts remembered as refused a grant (bounded by _MAX_COOLDOWNS)."""
        return len(self._cooldown)

    async def acquire(self, account_id: str, want_micros: int, smallest_micros: int = 1) -> int:
        """Take (or enlarge) this account's lease now; the micros granted (0: none)."""
        lease = self._lease_for(account_id, want_micros)
        if lease.taking or lease.closing:
            return 0
        lease.taking = True
        return await self._take(lease, want_micros, smallest_micros)

    def held(self, account_id: str) -> int:
        """Micros this sidecar may still allow from its lease on the account."""
        lease = self._leases.get(account_id)
        return 0 if lease is None or self._clock() >= lease.usable_until else lease.remaining

    def _lease_for(self, account_id: str, target: int) -> Lease:
        lease = self._leases.get(account_id)
        if lease is None:
            now = self._clock()
            lease = self._leases[account_id] = Lease(account_id, last_used=now, spent_since=now)
        lease.target = max(lease.target, target)
        return lease

    def _resize(self, lease: Lease, now: float) -> None:
        """Follow the account's spend: the lease should last about horizon_s."""
        elapsed = now - lease.spent_since
        if elapsed < _RESIZE_EVERY_S:
            return
        lease.target = max(lease.smallest, int(lease.spent / elapsed * self.config.horizon_s))
        lease.spent, lease.spent_since = 0, now

    # --- taking and refilling -------------------------------------------------

    def _refill(self, lease: Lease, smallest: int = 1) -> None:
        if lease.taking or lease.closing or self._closed:
            return
        want = lease.target - lease.remaining
        if want < smallest:
            return
        lease.taking = True
        self._spawn(self._taken(lease, want, smallest))

    async def _taken(self, lease: Lease, want: int, smallest: int) -> None:
        await self._take(lease, want, smallest)

    async def _take(self, lease: Lease, want: int, smallest: int) -> int:
        """Ask Redis for `want` more (the caller set lease.taking); the micros granted."""
        try:
            async with lease.lock:
                if lease.closing:  # released while we queued: its return came first
                    return 0
                sent_at = self._clock()
                grant = await self._hot.lease_take(
                    self.holder, lease.account_id, want, smallest, self.config.ttl_ms
                )
                if grant.granted_micros <= 0:
                    self._cool_down(lease.account_id, sent_at + _TAKE_COOLDOWN_S)
                    if lease.remaining == 0 and not lease.pending:
                        lease.closing = True
                        self._forget(lease)
                    return 0
                lease.remaining += grant.granted_micros
                lease.balance_seen = grant.balance_micros
                lease.stop_at, lease.stop_caps = grant.stop_at_micros, grant.stop_caps
                self._renewed(lease, sent_at)
        finally:
            lease.taking = False
        metrics.LEASES_HELD.set(len(self._leases))
        return grant.granted_micros

    def _renewed(self, lease: Lease, sent_at: float) -> None:
        if lease.closing:
            return
        ttl_s = self.config.ttl_ms / 1000
        # Stop using a lease well before Redis may reclaim it: a report must
        # reach Redis before the expiry, or the balance pays for it.
        lease.usable_until = sent_at + ttl_s * 0.75
        lease.renew_at = sent_at + ttl_s / 3

    def _forget(self, lease: Lease) -> None:
        if self._leases.get(lease.account_id) is lease:
            del self._leases[lease.account_id]
        metrics.LEASES_HELD.set(len(self._leases))

    # --- reporting ------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Report, renew and return leases until `stop`; then return them all."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_now.wait(), self.config.report_interval_s)
            self._report_now.clear()
            try:
                await self.report_due()
            except Exception:
                log.exception("lease report failed; leases stop being used when they expire")
        await self.close()

    async def report_due(self) -> None:
        now = self._clock()
        due = []
        quiet = []
        for lease in list(self._leases.values()):
            if lease.lock.locked() or lease.taking or lease.closing:
                continue
            if now - lease.last_used >= self.config.idle_s or now >= lease.usable_until:
                due.append(self.release(lease.account_id))
            elif lease.pending or now >= lease.renew_at:
                due.append(self._report(lease, return_all=False))  # learns of a recall too
            else:
                quiet.append(lease.account_id)
        self._rounds += 1
        if quiet and self._rounds % self._recall_poll_every == 0:
            # Leases with nothing to report still answer a recall, within ~100 ms.
            recalled = await self._hot.recalled(quiet)
            due += [self.release(a) for a, wanted in zip(quiet, recalled, strict=True) if wanted]
        # Called together: the reports share one pipeline (ScriptBatcher).
        await asyncio.gather(*due)

    async def flush_account(self, account_id: str) -> None:
        """Report this account's pending uses now (Settle needs their request records)."""
        lease = self._leases.get(account_id)
        if lease is not None and lease.pending:
            await self._report(lease, return_all=False)

    async def release(self, account_id: str) -> None:
        """Stop using the account's lease, report what it allowed, give the rest back."""
        lease = self._leases.get(account_id)
        if lease is None or lease.closing:
            return
        lease.closing = True
        lease.usable_until = 0.0  # no local decision from here on
        try:
            await self._report(lease, return_all=True)
        except BaseException:
            # Keep it, with the uses it has not reported, for the next round.
            lease.closing = False
            raise
        self._forget(lease)

    async def release_after_cut(self, account_id: str) -> None:
        """A cut (disable, lower limit) made through this sidecar recalled the account's
        leases: give this sidecar's back now rather than at its next report. The cut
        stands either way: if Redis fails here, the next report sees the recall."""
        try:
            await self.release(account_id)
        except Exception as error:  # noqa: BLE001 - the recall stays raised in Redis
            log.warning("lease on %r not returned after a cut: %s", account_id, error)

    async def close(self) -> None:
        """Shutdown: return every lease (after the listeners stopped)."""
        self._closed = True
        await asyncio.gather(*(self.release(a) for a in list(self._leases)), return_exceptions=True)
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        for lease in self._leases.values():
            # Redis did not answer: these were allowed and will never be charged.
            log.error(
                "lease on %r not returned: %d uses (%d micros) unreported",
                lease.account_id,
                len(lease.pending),
                lease.pending_micros,
            )

    async def _report(self, lease: Lease, *, return_all: bool) -> None:
        async with lease.lock:
            if lease.closing and not return_all:
                return  # the release that follows reports everything
            uses, lease.pending = lease.pending, []
            sent_micros, lease.pending_micros = lease.pending_micros, 0
            sent_at = self._clock()
            try:
                report = await self._hot.lease_report(
                    self.holder, lease.account_id, uses, self.config.ttl_ms, return_all=return_all
                )
            except BaseException:
                # Not recorded: report them again next time (the script de-duplicates).
                lease.pending[:0] = uses
                lease.pending_micros += sent_micros
                raise
            self._apply(lease, uses, report, sent_at, return_all)

    def _apply(
        self,
        lease: Lease,
        uses: list[LeasedUse],
        report: LeaseReport,
        sent_at: float,
        return_all: bool,
    ) -> None:
        if report.duplicates:
            decided_elsewhere = set(report.duplicates)
            lease.remaining += sum(
                u.amount_micros for u in uses if u.request_id in decided_elsewhere
            )
        lease.balance_seen = report.balance_micros
        if return_all:
            return
        # Redis is the authority: never spend more than it still counts as ours.
        lease.remaining = min(lease.remaining, report.held_micros - lease.pending_micros)
        if report.recall or lease.remaining <= 0:
            if report.recall:
                metrics.LEASE_RECALLS.inc()
            lease.usable_until = 0.0
            self._spawn(self.release(lease.account_id))  # after this report's lock
            return
        self._renewed(lease, sent_at)
        self._resize(lease, sent_at)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("lease work failed: %s", task.exception())
