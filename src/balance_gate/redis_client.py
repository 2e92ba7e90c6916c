"""The Redis client: standalone or Redis Cluster, with in-flight calls bounded by us.

redis-py's cluster client does not queue when a node's pool is full: it raises
MaxConnectionsError at once. So every command and every pipeline waits for a
slot of one semaphore (`in_flight`, redis_max_connections wide) before it
takes a connection, on both kinds of client: under a burst, calls queue here
instead of failing.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from balance_gate.settings import Settings


class _Bounded:
    """Mixed into a client class: each command holds an in-flight slot."""

    in_flight: asyncio.Semaphore

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        async with self.in_flight:
            return await super().execute_command(*args, **options)  # type: ignore[misc]


class BoundedRedis(_Bounded, aioredis.Redis):  # type: ignore[misc]
    pass


class BoundedRedisCluster(_Bounded, RedisCluster):  # type: ignore[misc]
    pass


async def execute_pipeline(
    client: aioredis.Redis, pipe: Any, *, raise_on_error: bool = True
) -> list[Any]:
    """Run a pipeline holding one in-flight slot (a pipeline is one round trip per node)."""
    slots: asyncio.Semaphore | None = getattr(client, "in_flight", None)
    if slots is None:  # a plain client (tests, tools)
        return cast(list[Any], await pipe.execute(raise_on_error=raise_on_error))
    async with slots:
        return cast(list[Any], await pipe.execute(raise_on_error=raise_on_error))


def is_cluster(client: aioredis.Redis) -> bool:
    return isinstance(client, RedisCluster)


def _reconnect_once() -> Retry:
    """A pooled connection that a network cut or a Redis restart closed fails its
    next command; that command is sent once more on a fresh connection. Safe:
    every script is idempotent (request ids, markers). Timeouts are not retried:
    the hot path has its own deadline (redis_call_timeout_ms)."""
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def redis_client(settings: Settings) -> aioredis.Redis:
    """The client for settings.redis_url; typed as Redis: the cluster client has the same
    command API, and the few places that differ ask is_cluster()."""
    timeout_s = settings.redis_timeout_ms / 1000
    url = settings.redis_url.get_secret_value()
    client: aioredis.Redis
    if settings.redis_cluster:
        client = cast(
            aioredis.Redis,
            BoundedRedisCluster.from_url(
                url,
                max_connections=settings.redis_max_connections,
                retry=_reconnect_once(),
                socket_timeout=timeout_s + settings.flush_block_ms / 1000,
                socket_connect_timeout=timeout_s,
            ),
        )
    else:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            # Waiting for a free connection counts against the same budget.
            timeout=timeout_s,
            retry=_reconnect_once(),
            socket_timeout=timeout_s + settings.flush_block_ms / 1000,
            socket_connect_timeout=timeout_s,
        )
        client = BoundedRedis(connection_pool=pool)
    client.in_flight = asyncio.Semaphore(settings.redis_max_connections)  # type: ignore[attr-defined]
    return client
