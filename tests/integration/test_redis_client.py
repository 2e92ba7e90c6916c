"""The Redis client bounds its in-flight calls itself (redis_client.py).

redis-py's cluster client raises MaxConnectionsError at once when a node's pool
is full; ours queues on a semaphore instead. `make test` runs this against a
standalone Redis and again against the 3-master cluster.
"""

from __future__ import annotations

import asyncio

from balance_gate.app import App
from balance_gate.settings import Settings
from tests.helpers import USD, fund, rid


async def test_a_burst_far_above_the_pool_size_queues_instead_of_failing(
    settings: Settings,
) -> None:
    narrow = settings.model_copy(update={"redis_max_connections": 2})
    async with App.opened(narrow, migrate=False) as app:
        await fund(app, "acme", USD)
        reads = [app.hot.read_account("acme") for _ in range(300)]
        debits = [app.gate.authorize("acme", rid(), 1, "") for _ in range(100)]
        results = await asyncio.gather(*reads, *debits)
        assert all(r is not None for r in results[:300])
        assert all(d.allowed for d in results[300:])  # type: ignore[union-attr]
        hot = await app.hot.read_account("acme")
        assert hot is not None
        assert hot.balance_micros == USD - 100
