"""Fault-test fixtures: a sidecar whose Redis is reached through a TCP proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import pytest

from balance_gate.app import App
from balance_gate.audit import audit_all, format_report
from balance_gate.server import Sidecar
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2_grpc, gate_pb2_grpc
from tests.conftest import RunningGate, Servers
from tests.faults.tcp_proxy import TcpProxy
from tests.helpers import wait_until_flushed

GateThroughProxy = Callable[..., AbstractAsyncContextManager[tuple[RunningGate, TcpProxy]]]


@pytest.fixture
def gate_through_proxy(servers: Servers, settings: Settings) -> GateThroughProxy:
    """A whole sidecar talking to the session's Redis through a TcpProxy;
    keyword arguments override settings."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[tuple[RunningGate, TcpProxy]]:
        proxy = await TcpProxy(servers.standalone_redis.port).start()
        config = Settings.model_validate(
            {
                **settings.model_dump(),
                "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
                "database_url": settings.database_url.get_secret_value(),
                **overrides,
            }
        )
        sidecar = Sidecar(await App.open(config, migrate=False))
        listening = await sidecar.start()
        gate_channel = grpc.aio.insecure_channel(f"127.0.0.1:{listening.gate_port}")
        admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{listening.admin_port}")
        try:
            yield (
                RunningGate(
                    sidecar.app,
                    listening,
                    gate_pb2_grpc.BalanceGateStub(gate_channel),
                    admin_pb2_grpc.AdminStub(admin_channel),
                    gate_channel,
                    admin_channel,
                ),
                proxy,
            )
        finally:
            proxy.set("pass")
            await gate_channel.close(None)
            await admin_channel.close(None)
            await sidecar.stop()
            await proxy.stop()

    return start


async def assert_audit_clean(app: App) -> None:
    """`balance-gate audit` finds no difference (after the flusher caught up)."""
    await wait_until_flushed(app)
    report = await audit_all(app.pg, app.hot, app.flusher)
    assert not report.differences, "\n".join(format_report(report))
    assert report.accounts > 0
