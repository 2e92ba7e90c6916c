"""`balance-gate healthcheck`: the container health check (deploy/docker/Dockerfile)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from tests.conftest import RunningGate
from tests.helpers import sidecar_env


async def _healthcheck(
    settings: Settings, *args: str, **more_settings: str
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "balance_gate", "healthcheck", *args],
        env=sidecar_env(settings, None, **more_settings),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


async def test_a_serving_gate_is_healthy(settings: Settings, running: RunningGate) -> None:
    address = f"127.0.0.1:{running.listening.gate_port}"
    result = await _healthcheck(settings, "--address", address)
    assert (result.returncode, result.stdout) == (0, f"{address}: SERVING\n")
    # The gate's own service name answers as well.
    result = await _healthcheck(
        settings, "--address", address, "--service", "balance_gate.v1.BalanceGate"
    )
    assert result.returncode == 0, result.stderr


async def test_nothing_listening_or_an_unknown_service_is_unhealthy(
    settings: Settings, running: RunningGate
) -> None:
    address = f"0.0.0.0:{free_port()}"  # a wildcard address is dialled on loopback
    result = await _healthcheck(settings, "--address", address, "--timeout", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == f"127.0.0.1:{address.rsplit(':')[1]}: UNAVAILABLE"
    gate = f"127.0.0.1:{running.listening.gate_port}"
    result = await _healthcheck(settings, "--address", gate, "--service", "no.such.Service")
    assert (result.returncode, result.stderr) == (1, f"{gate}: NOT_FOUND\n")


async def test_it_reads_the_gate_address_from_the_settings(
    settings: Settings, running: RunningGate
) -> None:
    address = f"127.0.0.1:{running.listening.gate_port}"
    result = await _healthcheck(settings, gate_listen=address)
    assert (result.returncode, result.stdout) == (0, f"{address}: SERVING\n")
