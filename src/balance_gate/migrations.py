"""Apply the .sql files in balance_gate/sql in order, each once.

Each file runs in its own transaction together with its row in
schema_migrations; a transaction-scoped advisory lock makes concurrent
starters (several sidecars) wait for each other instead of racing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from balance_gate.postgres_store import Connection

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x6267_0001
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    found = []
    for entry in resources.files("balance_gate").joinpath("sql").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


async def migrate(conn: Connection) -> list[int]:
    """Apply what is missing; return the versions applied now."""
    async with conn.transaction():
        # Under the lock: two first starts must not both create the table.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
    applied_now = []
    for migration in available():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            done = await conn.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version
            )
            if done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
            log.info("applied migration %04d_%s", migration.version, migration.name)
    return applied_now
