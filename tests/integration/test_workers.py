"""`balance-gate serve --workers 2`: two processes share the ports (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pydantic
import pytest

from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2, admin_pb2_grpc, gate_pb2_grpc
from tests.helpers import (
    USD,
    authorize_request,
    free_ports_in_a_row,
    fund_over_grpc,
    sidecar_env,
    wait_serving,
)

CONNECTIONS = 24  # the chance that all of them land on one of two workers is 2**-23


@pytest.fixture
def two_workers(
    settings: Settings, tmp_path: Path
) -> Iterator[tuple[dict[str, int], subprocess.Popen[bytes]]]:
    ports = {"gate": free_port(), "admin": free_port(), "metrics": free_ports_in_a_row(2)}
    env = sidecar_env(settings, ports, flush_interval_ms="5")
    log = (tmp_path / "gate.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "balance_gate", "serve", "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield ports, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


async def _metrics_answer(metrics_ports: list[int], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    for port in metrics_ports:
        while True:
            assert process.poll() is None, "the workers exited"
            try:
                await asyncio.to_thread(_authorize_count, port)
                break
            except OSError:
                assert time.monotonic() < deadline, f"worker metrics on {port} never answered"
                await asyncio.sleep(0.05)  # polling a process's start-up, bounded


def _authorize_count(metrics_port: int) -> int:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    match = re.search(rb'balance_gate_authorize_total\{result="allowed"\} ([0-9.e+]+)', body)
    return int(float(match.group(1))) if match else 0


async def test_two_workers_serve_one_port_and_debit_exactly(
    two_workers: tuple[dict[str, int], subprocess.Popen[bytes]],
) -> None:
    ports, process = two_workers
    target = f"127.0.0.1:{ports['gate']}"
    admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['admin']}")
    # Own subchannel pools: one TCP connection per channel, spread by the kernel.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]
    try:
        await wait_serving(admin_channel, process)
        # Both workers, not just the first up: a worker's /metrics opens last.
        await _metrics_answer([ports["metrics"] + i for i in range(2)], process)
        admin = admin_pb2_grpc.AdminStub(admin_channel)
        await fund_over_grpc(admin, "shared", 10 * USD)
        stubs = [gate_pb2_grpc.BalanceGateStub(channel) for channel in channels]
        answers = await asyncio.gather(
            *(
                stubs[i % CONNECTIONS].Authorize(authorize_request("shared", 10_000))
                for i in range(1_200)
            )
        )
        assert sum(a.allowed for a in answers) == 1_000  # $10 pays for exactly 1,000
        account = await admin.GetAccount(admin_pb2.GetAccountRequest(account_id="shared"))
        assert account.balance_micros == 0
        # Both workers decided some of them, and each serves its own /metrics.
        per_worker = [_authorize_count(ports["metrics"] + i) for i in range(2)]
        assert all(count > 0 for count in per_worker), per_worker
        assert sum(per_worker) == 1_000
    finally:
        for channel in [*channels, admin_channel]:
            await channel.close(None)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_workers_need_fixed_ports() -> None:
    with pytest.raises(
        pydantic.ValidationError, match="gate_listen: workers > 1 needs a fixed port"
    ):
        Settings(workers=2, gate_listen="127.0.0.1:0")


async def test_workers_stop_when_the_supervisor_is_killed(
    two_workers: tuple[dict[str, int], subprocess.Popen[bytes]],
) -> None:
    """A SIGKILLed supervisor cannot stop its workers: they notice and stop themselves."""
    ports, process = two_workers
    await _metrics_answer([ports["metrics"] + i for i in range(2)], process)
    workers = _children(process.pid)
    assert len(workers) >= 2
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while alive := _running(workers):
        assert time.monotonic() < deadline, f"orphaned workers still running: {alive}"
        await asyncio.sleep(0.1)  # polling for the workers' exit, bounded


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]
