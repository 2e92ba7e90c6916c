"""`balance-gate report --month YYYY-MM --format csv|json`: P15 for every account."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields
from typing import TextIO

import asyncpg

from balance_gate.top_up_store import MonthlyReport
from balance_gate.topups import TopUps

COLUMNS = ["account_id", *(f.name for f in fields(MonthlyReport))]


async def write_reports(
    pool: asyncpg.Pool, topups: TopUps, month: str, fmt: str, out: TextIO
) -> int:
    """Write one row per account (ordered by id); the number of accounts."""
    account_ids = [
        row["account_id"]
        for row in await pool.fetch("SELECT account_id FROM accounts ORDER BY account_id")
    ]
    writer = csv.DictWriter(out, COLUMNS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    for account_id in account_ids:
        report = await topups.monthly_report(account_id, month)
        row = {"account_id": account_id, **asdict(report), "month": month}
        if writer is not None:
            writer.writerow(row)
        else:
            out.write(json.dumps(row) + "\n")
    return len(account_ids)
