"""Fault-test fixtures: a sidecar whose Redis is reached through a TCP proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from balance_gate.app import App
from balance_gate.audit import audit_all, format_report
from balance_gate.settings import Settings
from tests.conftest import RunningGate, Servers, running_gate
from tests.faults.tcp_proxy import TcpProxy
from tests.helpers import wait_until_flushed, with_settings

GateThroughProxy = Callable[..., AbstractAsyncContextManager[tuple[RunningGate, TcpProxy]]]


@pytest.fixture
def gate_through_proxy(servers: Servers, settings: Settings) -> GateThroughProxy:
    """A whole sidecar talking to the session's Redis through a TcpProxy;
    keyword arguments override settings."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[tuple[RunningGate, TcpProxy]]:
        proxy = await TcpProxy(servers.standalone_redis.port).start()
        through = with_settings(
            settings, redis_url=f"redis://127.0.0.1:{proxy.port}/0", **overrides
        )
        try:
            async with running_gate(through) as running:
                try:
                    yield running, proxy
                finally:
                    proxy.set("pass")  # the sidecar flushes on its way out
        finally:
            await proxy.stop()

    return start


async def assert_audit_clean(app: App) -> None:
    """`balance-gate audit` finds no difference (after the flusher caught up)."""
    await wait_until_flushed(app)
    report = await audit_all(app.pg, app.hot, app.flusher)
    assert report.clean, "\n".join(format_report(report))
    assert report.accounts > 0
