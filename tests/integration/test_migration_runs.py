"""Migrations: applied in order, recorded, and applying them again changes nothing."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg

from balance_gate import migrations
from tests.conftest import Servers, create_database

_databases = itertools.count()


async def _fresh_database(servers: Servers) -> str:
    return await create_database(servers, f"migrations_{next(_databases)}")


async def test_applying_migrations_twice_changes_nothing(servers: Servers) -> None:
    conn = await asyncpg.connect(await _fresh_database(servers))
    try:
        versions = [m.version for m in migrations.available()]
        assert await migrations.migrate(conn) == versions
        assert await migrations.migrate(conn) == []
        recorded = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == versions
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        assert {"accounts", "credits", "usage_events"} <= {t["tablename"] for t in tables}
    finally:
        await conn.close()


async def test_concurrent_first_starts_apply_each_migration_once(servers: Servers) -> None:
    dsn = await _fresh_database(servers)
    connections = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(migrations.migrate(c) for c in connections))
        versions = [m.version for m in migrations.available()]
        assert sorted(v for run in applied for v in run) == versions
        count = await connections[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(versions)
    finally:
        for conn in connections:
            await conn.close()
