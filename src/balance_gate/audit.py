"""`balance-gate audit`: every hot balance against the Postgres ledger, read-only for money.

Per shard, holding its exclusive lock (no flusher is between its Postgres
commit and its Redis acknowledgement), usage that a crashed flusher read but
never acknowledged is recorded first (idempotent, as in a rebuild); then for
each account loaded in Redis:

    balance + leased + unflushed  must equal  the ledger's credited - used

An account that is not in Redis has nothing to disagree with (it is loaded
from the ledger when next used). A credit committed in Postgres but not yet
applied to Redis shows as a difference until the credit sweeper applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balance_gate.flusher import UsageFlusher
from balance_gate.postgres_store import PostgresStore
from balance_gate.rebuild import shards_locked
from balance_gate.redis_store import RedisStore


@dataclass(frozen=True)
class Difference:
    account_id: str
    hot_micros: int  # balance + leased + unflushed
    ledger_micros: int
    unapplied_credits: int

    @property
    def delta_micros(self) -> int:
        return self.hot_micros - self.ledger_micros


@dataclass
class AuditReport:
    accounts: int = 0
    not_loaded: int = 0
    pending_usage_recorded: int = 0
    # Pending usage events the ledger refused, set aside now (usage_dead_letters).
    usage_set_aside: int = 0
    differences: list[Difference] = field(default_factory=list)


async def audit_all(
    pg: PostgresStore, hot: RedisStore, flusher: UsageFlusher, page_size: int = 1_000
) -> AuditReport:
    report = AuditReport()
    set_aside_before = flusher.set_aside_count
    async for conn, members, recorded in shards_locked(pg, flusher, page_size):
        report.pending_usage_recorded += recorded
        for account_id in members:
            snapshot = await pg.load_snapshot(conn, account_id)
            state = await hot.read_account(account_id)
            if snapshot is None:
                continue
            report.accounts += 1
            if state is None:
                report.not_loaded += 1
                continue
            held = state.balance_micros + state.unflushed_micros
            if held != snapshot.ledger_balance_micros or snapshot.unapplied_credit_ids:
                report.differences.append(
                    Difference(
                        account_id,
                        held,
                        snapshot.ledger_balance_micros,
                        len(snapshot.unapplied_credit_ids),
                    )
                )
    report.usage_set_aside = flusher.set_aside_count - set_aside_before
    return report


def format_report(report: AuditReport) -> list[str]:
    lines = [
        f"{d.account_id}: hot {d.hot_micros} (balance + leased + unflushed) vs ledger"
        f" {d.ledger_micros}: difference {d.delta_micros:+d} micros"
        + (f", {d.unapplied_credits} credits not yet applied" if d.unapplied_credits else "")
        for d in report.differences
    ]
    if report.usage_set_aside:
        lines.append(
            f"{report.usage_set_aside} usage events set aside in usage_dead_letters:"
            " the ledger refused them (docs/reliability.md)"
        )
    lines.append(
        f"audited {report.accounts} accounts ({report.not_loaded} not in Redis):"
        f" {len(report.differences)} differ;"
        f" {report.pending_usage_recorded} unacknowledged usage events recorded first"
    )
    return lines
