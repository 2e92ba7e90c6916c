"""Real servers for the whole session; a fresh database and key prefix per test.

One redis-server and one postgres start per session on free ports in a
temporary directory. Each test gets its own database, cloned from a migrated
template (fast), and its own Redis key prefix, so tests never see each other.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from balance_gate import migrations
from balance_gate.app import App
from balance_gate.devservers import PostgresServer, RedisClusterServers, RedisServer, free_port
from balance_gate.server import Listening, Sidecar
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2_grpc, gate_pb2_grpc

TEMPLATE_DB = "bg_template"
_counter = itertools.count(1)
# BALANCE_GATE_TEST_REDIS=cluster runs the tests against a 3-master Redis Cluster
# (`make test` does so for the core suite: Makefile, CLUSTER_TESTS).
CLUSTER = os.environ.get("BALANCE_GATE_TEST_REDIS") == "cluster"


@dataclass(frozen=True)
class Servers:
    redis: RedisServer | RedisClusterServers
    postgres: PostgresServer

    @property
    def standalone_redis(self) -> RedisServer:
        """For tests that need one server (they are not in the cluster suite)."""
        if not isinstance(self.redis, RedisServer):
            pytest.skip("needs a standalone Redis")
        return self.redis


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    root = Path(tempfile.mkdtemp(prefix="balance-gate-test-"))
    root.chmod(0o755)  # postgres may run as `nobody` and must reach its directory
    redis: RedisServer | RedisClusterServers = (
        RedisClusterServers(root / "redis")
        if CLUSTER
        else RedisServer(root / "redis", free_port(), durable=False)
    )
    postgres = PostgresServer(root / "postgres", free_port(), durable=False)
    redis.start()
    try:
        postgres.start()
        yield Servers(redis, postgres)
    finally:
        postgres.stop()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


async def create_database(servers: Servers, name: str, template: str | None = None) -> str:
    """Create a database on the session's Postgres; return its DSN."""
    admin = await asyncpg.connect(servers.postgres.dsn())
    try:
        clause = f" TEMPLATE {template}" if template else ""
        await admin.execute(f"CREATE DATABASE {name}{clause}")
    finally:
        await admin.close()
    return servers.postgres.dsn(name)


@pytest.fixture(scope="session")
async def template_database(servers: Servers) -> str:
    await create_database(servers, TEMPLATE_DB)
    conn = await asyncpg.connect(servers.postgres.dsn(TEMPLATE_DB))
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    return TEMPLATE_DB


@pytest.fixture
async def settings(servers: Servers, template_database: str) -> Settings:
    n = next(_counter)
    dsn = await create_database(servers, f"t{os.getpid()}_{n}", template_database)
    return Settings(
        redis_url=servers.redis.url,  # type: ignore[arg-type]
        database_url=dsn,  # type: ignore[arg-type]
        redis_key_prefix=f"t{n}",
        redis_cluster=CLUSTER,
        gate_listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        flush_block_ms=20,
        flush_interval_ms=5,
        stats_interval_ms=200,
        shutdown_grace_ms=1_000,
        # A loaded CI machine can hold a pipeline's reply past 500 ms; only the fault
        # tests, which set their own, are about that deadline.
        redis_call_timeout_ms=5_000,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    """The core without listeners or background tasks: tests drive it directly."""
    application = await App.open(settings, migrate=False)
    await application.hot.ensure_usage_groups()
    try:
        yield application
    finally:
        await application.close()


@dataclass
class RunningGate:
    app: App
    listening: Listening
    gate: gate_pb2_grpc.BalanceGateAsyncStub
    admin: admin_pb2_grpc.AdminAsyncStub
    gate_channel: grpc.aio.Channel
    admin_channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Sidecar, Listening]]:
    """A whole sidecar (listeners, flusher, sweeper) on `settings`, stopped on exit."""
    sidecar = Sidecar(await App.open(settings, migrate=False))
    listening = await sidecar.start()
    try:
        yield sidecar, listening
    finally:
        await sidecar.stop()


@contextlib.asynccontextmanager
async def running_gate(settings: Settings) -> AsyncIterator[RunningGate]:
    """A whole sidecar on `settings` and clients of both its ports, all closed on exit."""
    async with serving(settings) as (sidecar, listening):
        gate_channel = grpc.aio.insecure_channel(f"127.0.0.1:{listening.gate_port}")
        admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{listening.admin_port}")
        try:
            yield RunningGate(
                sidecar.app,
                listening,
                gate_pb2_grpc.BalanceGateStub(gate_channel),
                admin_pb2_grpc.AdminStub(admin_channel),
                gate_channel,
                admin_channel,
            )
        finally:
            await gate_channel.close(None)
            await admin_channel.close(None)


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[RunningGate]:
    """A whole sidecar (listeners, flusher, sweeper) and clients of both ports."""
    async with running_gate(settings) as gate:
        yield gate


@pytest.fixture
async def redis_client(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = (
        cast(aioredis.Redis, RedisCluster.from_url(servers.redis.url))
        if CLUSTER
        else aioredis.Redis.from_url(servers.redis.url)
    )
    try:
        yield client
    finally:
        await client.aclose()
