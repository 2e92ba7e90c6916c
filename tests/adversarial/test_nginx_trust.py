"""Issue 12 item 1: what a client sends through the shipped nginx configuration.

A real nginx (Debian's package) runs deploy/nginx/balance-gate.conf unchanged but for
its three addresses, in front of the sidecar's HTTP endpoint and an upstream that
counts what it serves. Whatever the client sends, every request the upstream serves
is paid for at the price the configuration sets, by the account its API key maps to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from balance_gate.app import App
from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from tests.conftest import serving
from tests.helpers import fund, wait_until_flushed
from tests.integration.test_nginx_auth_request import (
    CENT,
    _start_nginx,
    _wait_listening,
    _write_config,
)

API_KEY = {"X-Api-Key": "demo-api-key"}  # mapped to account "demo" by the shipped file


@dataclass
class Upstream:
    served: int = 0


@dataclass(frozen=True)
class Edge:
    url: str
    app: App
    upstream: Upstream


async def _counting_upstream(upstream: Upstream) -> tuple[web.AppRunner, int]:
    async def serve(_: web.Request) -> web.Response:
        upstream.served += 1
        return web.Response(text="served")

    application = web.Application()
    application.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def edge(settings: Settings, tmp_path: Path) -> AsyncIterator[Edge]:
    upstream = Upstream()
    runner, upstream_port = await _counting_upstream(upstream)
    http_settings = settings.model_copy(update={"http_authz_listen": "127.0.0.1:0"})
    async with serving(http_settings) as (sidecar, listening):
        assert listening.http_authz_port is not None
        nginx_port = free_port()
        config = _write_config(tmp_path, listening.http_authz_port, upstream_port, nginx_port)
        process = _start_nginx(config, tmp_path)
        try:
            await _wait_listening(nginx_port, process, tmp_path / "error.log")
            yield Edge(f"http://127.0.0.1:{nginx_port}/v1/things", sidecar.app, upstream)
        finally:
            process.terminate()
            process.wait(timeout=10)
    await runner.cleanup()


async def _get(url: str, headers: dict[str, str], times: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as client:
        for _ in range(times):
            async with client.get(url, headers=headers) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def _debited(app: App, account_id: str) -> int:
    """What the ledger recorded as debited from `account_id`, once flushed."""
    await wait_until_flushed(app)
    total = await app.pool.fetchval(
        "SELECT coalesce(sum(amount_micros), 0) FROM usage_events WHERE account_id = $1",
        account_id,
    )
    return int(total)


async def _hot_balance(app: App, account_id: str) -> int:
    hot = await app.hot.read_account(account_id)
    assert hot is not None
    return hot.balance_micros


async def test_a_repeated_client_request_id_buys_no_free_replays(edge: Edge) -> None:
    """Issue 12 item 1: five GETs with one client X-Request-Id were served five times
    and debited once (four free `replayed` allows)."""
    funded = 100 * CENT
    await fund(edge.app, "demo", funded)
    statuses = await _get(edge.url, {**API_KEY, "X-Request-Id": "pay-once"}, times=5)

    assert statuses == [200] * 5
    assert edge.upstream.served == 5
    assert await _debited(edge.app, "demo") == edge.upstream.served * CENT
    assert await _hot_balance(edge.app, "demo") == funded - edge.upstream.served * CENT


async def test_client_balance_headers_change_neither_account_price_nor_capability(
    edge: Edge,
) -> None:
    """Issue 12 item 1: a client's X-Balance-Account / -Cost-Micros / -Capability must
    not reach the gate; the account, price and capability are the configuration's."""
    funded = 100 * CENT
    await fund(edge.app, "demo", funded)
    await fund(edge.app, "victim", funded)
    forged = {
        "X-Balance-Account": "victim",
        "X-Balance-Cost-Micros": "0",
        "X-Balance-Capability": "forged-capability",
    }

    paying = await _get(edge.url, {**API_KEY, **forged}, times=3)
    anonymous = await _get(edge.url, forged, times=2)  # no API key: no account

    assert paying == [200] * 3
    assert anonymous == [403] * 2
    assert edge.upstream.served == 3
    assert await _debited(edge.app, "demo") == 3 * CENT
    assert await _debited(edge.app, "victim") == 0
    assert await _hot_balance(edge.app, "victim") == funded
    capabilities = await edge.app.pool.fetch(
        "SELECT DISTINCT capability FROM usage_events WHERE account_id = 'demo'"
    )
    assert [row["capability"] for row in capabilities] == [""]
