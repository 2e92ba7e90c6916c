"""`balance-gate audit`: every hot balance against the Postgres ledger, read-only for money.

Per shard, holding its exclusive lock (no flusher is between its Postgres
commit and its Redis acknowledgement), usage that a crashed flusher read but
never acknowledged is recorded first (idempotent, as in a rebuild); then for
each account loaded in Redis:

    balance + leased + unflushed  must equal  the ledger's credited - used

An account that is not in Redis has nothing to disagree with (it is loaded
from the ledger when next used). A credit committed in Postgres but not yet
applied to Redis shows as a difference until the credit sweeper applies it.

Then the ledger on its own (issue 13 item 2: hot state and ledger can agree on
money the ledger should never have given back), for every account, without
a lock: used_micros must equal the sum of its usage rows, and no request's
rows may sum below 0 (a settle gives back at most what its request was
charged). Together: used only goes down by what it went up for the same
request, never without a credit. Any finding makes `audit` exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balance_gate.flusher import UsageFlusher
from balance_gate.postgres_store import PostgresStore, RequestBelowZero, UsedNotSummed
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
    requests_below_zero: list[RequestBelowZero] = field(default_factory=list)
    used_not_summed: list[UsedNotSummed] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing to report: `audit` exits 0."""
        return not (self.differences or self.requests_below_zero or self.used_not_summed)


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
    await _check_ledger(pg, report, page_size)
    return report


async def _check_ledger(pg: PostgresStore, report: AuditReport, page_size: int) -> None:
    after = ""
    while account_ids := await pg.account_ids(after, page_size):
        after = account_ids[-1]
        report.requests_below_zero += await pg.requests_below_zero(account_ids)
        report.used_not_summed += await pg.used_not_summed(account_ids)


def format_report(report: AuditReport) -> list[str]:
    lines = [
        f"{d.account_id}: hot {d.hot_micros} (balance + leased + unflushed) vs ledger"
        f" {d.ledger_micros}: difference {d.delta_micros:+d} micros"
        + (f", {d.unapplied_credits} credits not yet applied" if d.unapplied_credits else "")
        for d in report.differences
    ]
    lines += [
        f"{r.account_id}: request {r.request_id!r} costs {r.cost_micros} micros:"
        " the ledger gave back more than it charged (used went down without a credit)"
        for r in report.requests_below_zero
    ]
    lines += [
        f"{u.account_id}: used {u.used_micros} micros but its usage rows sum to {u.rows_micros}"
        for u in report.used_not_summed
    ]
    if report.usage_set_aside:
        lines.append(
            f"{report.usage_set_aside} usage events set aside in usage_dead_letters:"
            " the ledger refused them (docs/reliability.md)"
        )
    lines.append(
        f"audited {report.accounts} accounts ({report.not_loaded} not in Redis):"
        f" {len(report.differences)} differ;"
        f" {len(report.requests_below_zero) + len(report.used_not_summed)} ledger faults;"
        f" {report.pending_usage_recorded} unacknowledged usage events recorded first"
    )
    return lines
