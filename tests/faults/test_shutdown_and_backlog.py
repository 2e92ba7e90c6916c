"""SIGTERM under load, and the bound on usage waiting for Postgres."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from balance_gate import metrics
from balance_gate.app import App
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2_grpc
from tests.faults.load import Load
from tests.faults.processes import SidecarProcess
from tests.faults.test_process_faults import CENT, _recorded
from tests.helpers import USD, fund, fund_over_grpc, rid

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_sigterm_goes_not_serving_first_then_flushes_everything_and_exits(
    settings: Settings, tmp_path: Path
) -> None:
    sidecar = SidecarProcess(settings, tmp_path / "sidecar.log")
    await sidecar.start()
    try:
        await fund_over_grpc(admin_pb2_grpc.AdminStub(sidecar.admin_channel), "acme", 100 * USD)
        watch = health_pb2_grpc.HealthStub(sidecar.channel).Watch(
            health_pb2.HealthCheckRequest(service="")
        )
        assert (await watch.read()).status == SERVING
        load = Load(sidecar.channel, "acme", CENT)
        load.start()
        await load.until_calls(200)

        assert sidecar.process is not None
        sidecar.process.send_signal(signal.SIGTERM)
        assert (await watch.read()).status == NOT_SERVING  # before it stops answering
        exit_code = await asyncio.to_thread(sidecar.process.wait, 60)
        seen = await load.stop()
        watch.cancel()

        assert exit_code == 0
        # Nothing runs any more: what the proxies saw allowed is already in Postgres.
        recorded = await _recorded(settings.database_url.get_secret_value(), "acme")
        assert set(recorded) == set(seen.allowed)
        assert seen.allowed
        audit = sidecar.cli("audit")
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        await sidecar.close()


async def test_usage_backlog_bound_denies_unavailable_and_debits_nothing(
    settings: Settings,
) -> None:
    """Postgres away long enough: Authorize stops debiting what it could not record."""
    bounded = settings.model_copy(update={"usage_backlog_max": 5})
    async with App.opened(bounded, migrate=False) as app:  # no flusher runs: usage stays in Redis
        await fund(app, "acme", USD)
        for _ in range(5):
            assert (await app.gate.authorize("acme", rid(), CENT, "")).allowed
        refused = await app.gate.authorize("acme", rid(), CENT, "")
        assert not refused.allowed
        assert refused.code == "unavailable"
        hot = await app.hot.read_account("acme")
        assert hot is not None
        assert hot.balance_micros == USD - 5 * CENT
        await app.flusher.refresh_stats()  # what the alert watches: 5 of 5
        assert metrics.USAGE_BACKLOG_FULLEST_SHARD._value.get() == 5
