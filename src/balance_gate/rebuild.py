"""`balance-gate rebuild`: make every hot balance agree with the ledger, under live traffic.

Per shard, holding its exclusive lock: record the usage events someone read
but did not acknowledge (they may already be in Postgres and still counted in
`unflushed`), then reconcile each account so that
balance = ledger balance - usage still waiting in the stream.
Corrections are added with HINCRBY, never set, so a debit running at the same
moment is neither lost nor counted twice.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from balance_gate.accounts import Accounts
from balance_gate.flusher import UsageFlusher
from balance_gate.keys import shard_of
from balance_gate.postgres_store import Connection, PostgresStore

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    accounts: int = 0
    corrected: int = 0
    # Sum of |correction| over all accounts, in micro-units.
    correction_micros: int = 0
    pending_usage_recorded: int = 0
    # Pending usage events the ledger refused, set aside now (usage_dead_letters).
    usage_set_aside: int = 0


async def shards_locked(
    pg: PostgresStore, flusher: UsageFlusher, page_size: int = 1_000
) -> AsyncIterator[tuple[Connection, list[str], int]]:
    """Every account, a shard at a time: (connection holding the shard's exclusive
    lock, the shard's accounts of this page, unacknowledged usage recorded first)."""
    after = ""
    while account_ids := await pg.account_ids(after, page_size):
        after = account_ids[-1]
        by_shard: dict[int, list[str]] = defaultdict(list)
        for account_id in account_ids:
            by_shard[shard_of(account_id)].append(account_id)
        for shard, members in sorted(by_shard.items()):
            async with pg.shard_lock([shard], exclusive=True) as conn:
                recorded = await flusher.record_pending_locked(conn, shard)
                yield conn, members, recorded


async def rebuild_all(
    pg: PostgresStore, accounts: Accounts, flusher: UsageFlusher, page_size: int = 1_000
) -> RebuildReport:
    report = RebuildReport()
    set_aside_before = flusher.set_aside_count
    async for conn, members, recorded in shards_locked(pg, flusher, page_size):
        report.pending_usage_recorded += recorded
        for account_id in members:
            correction = await accounts.reconcile_locked(conn, account_id)
            if correction is None:  # deleted meanwhile
                continue
            report.accounts += 1
            if correction:
                report.corrected += 1
                report.correction_micros += abs(correction)
                log.warning(
                    "account %r: hot balance corrected by %d micros", account_id, correction
                )
    report.usage_set_aside = flusher.set_aside_count - set_aside_before
    return report
