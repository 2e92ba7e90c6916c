"""Balance leasing across three real sidecar processes on one Redis and one Postgres."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from balance_gate.app import App
from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2, admin_pb2_grpc, gate_pb2, gate_pb2_grpc
from tests.helpers import (
    USD,
    fund_over_grpc,
    ledger_balance,
    sidecar_env,
    wait_serving,
    wait_until_flushed,
)

CENT = 10_000
LEASE_TTL_MS = 1_500


@dataclass
class Process:
    process: subprocess.Popen[bytes]
    gate_port: int
    admin_port: int
    metrics_port: int
    channel: grpc.aio.Channel
    gate: gate_pb2_grpc.BalanceGateAsyncStub

    def metric(self, name: str) -> int:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read()
        match = re.search(rb"^" + name.encode() + rb" ([0-9.e+]+)", body, re.MULTILINE)
        return int(float(match.group(1))) if match else 0

    def leases_held(self) -> int:
        return self.metric("balance_gate_leases_held")

    async def authorize(self, request_id: str, account: str) -> gate_pb2.AuthorizeResponse:
        request = gate_pb2.AuthorizeRequest(
            account_id=account, request_id=request_id, amount_micros=CENT
        )
        return await self.gate.Authorize(request, timeout=10)


def _start(settings: Settings, log: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {"gate": free_port(), "admin": free_port(), "metrics": free_port()}
    env = sidecar_env(
        settings,
        ports,
        flush_interval_ms="5",
        # The killed sidecar's unacknowledged usage is taken over soon.
        flush_claim_idle_ms="300",
        lease_accounts="*",
        lease_min_rate="5",
        lease_report_interval_ms="5",
        lease_ttl_ms=str(LEASE_TTL_MS),
        lease_recall_wait_ms="2000",
        lease_idle_ms="30000",  # held through the whole test
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "balance_gate", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, ports


@pytest.fixture
async def three(settings: Settings, tmp_path: Path) -> AsyncIterator[list[Process]]:
    started = [_start(settings, tmp_path / f"gate-{i}.log") for i in range(3)]
    processes = []
    try:
        for process, ports in started:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['gate']}")
            processes.append(
                Process(
                    process,
                    ports["gate"],
                    ports["admin"],
                    ports["metrics"],
                    channel,
                    gate_pb2_grpc.BalanceGateStub(channel),
                )
            )
        for one in processes:
            await wait_serving(one.channel, one.process)
        yield processes
    finally:
        for one in processes:
            await one.channel.close(None)
        for process, _ in started:
            if process.poll() is None:
                process.kill()
                process.wait()


async def _warm_until_leased(one: Process, account: str, prefix: str) -> int:
    """Steady traffic on one sidecar until it holds a lease; returns requests allowed."""
    allowed = 0
    deadline = time.monotonic() + 20
    n = 0
    while await asyncio.to_thread(one.leases_held) == 0:
        assert time.monotonic() < deadline, "no lease was taken"
        for _ in range(3):
            n += 1
            allowed += (await one.authorize(f"{prefix}-{n}", account)).allowed
        await asyncio.sleep(0.05)  # a steady rate, which is what makes a lease
    return allowed


async def _stop(one: Process) -> None:
    one.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(one.process.wait, 60) == 0


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"


async def test_three_leasing_sidecars_charge_exactly_once_and_never_overspend(
    three: list[Process], app: App
) -> None:
    admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{three[0].admin_port}")
    admin = admin_pb2_grpc.AdminStub(admin_channel)
    await fund_over_grpc(admin, "hot", 5 * USD)
    warm = [await _warm_until_leased(one, "hot", f"warm{i}") for i, one in enumerate(three)]
    assert all(held == 1 for held in [one.leases_held() for one in three])

    # 400 distinct requests, each sent to two different sidecars at once: more
    # demand than money, and every request retried elsewhere (idempotency).
    async def both(i: int) -> set[str]:
        first, second = three[i % 3], three[(i + 1) % 3]
        answers = await asyncio.gather(
            first.authorize(f"burst-{i}", "hot"), second.authorize(f"burst-{i}", "hot")
        )
        return {f"burst-{i}"} if any(a.allowed for a in answers) else set()

    allowed_ids = set().union(*await asyncio.gather(*(both(i) for i in range(400))))
    # Each sidecar decided some requests from its lease, without Redis.
    assert all(one.metric("balance_gate_leased_authorize_total") > 0 for one in three)
    for one in three:
        await _stop(one)  # returns its lease and flushes its usage
    await admin_channel.close(None)

    await wait_until_flushed(app)
    budget = 5 * USD // CENT - sum(warm)
    # Never more than the money: no overspend. Never less: leased money was
    # recalled whenever someone needed it, so nothing was denied while it could pay.
    assert len(allowed_ids) == min(400, budget)
    assert await ledger_balance(app, "hot") == 5 * USD - (sum(warm) + len(allowed_ids)) * CENT
    charged = await app.pool.fetch(
        "SELECT request_id, count(*) AS n FROM usage_events"
        " WHERE account_id = 'hot' AND request_id LIKE 'burst-%' GROUP BY request_id"
    )
    assert {row["request_id"] for row in charged} == allowed_ids
    assert all(row["n"] == 1 for row in charged)  # each charged exactly once
    hot = await app.hot.read_account("hot")
    assert hot is not None
    assert hot.leased_micros == 0


async def test_sidecar_killed_with_a_lease_gives_it_back_after_expiry(
    three: list[Process], app: App
) -> None:
    admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{three[0].admin_port}")
    admin = admin_pb2_grpc.AdminStub(admin_channel)
    await fund_over_grpc(admin, "victim", 2 * USD)
    doomed, survivor = three[2], three[0]
    await _warm_until_leased(doomed, "victim", "warm")
    doomed.process.kill()  # SIGKILL: no report, no return
    doomed.process.wait()
    hot = await app.hot.read_account("victim")
    assert hot is not None
    assert hot.leased_micros > 0  # the dead sidecar's lease is still out
    left = (await admin.GetAccount(admin_pb2.GetAccountRequest(account_id="victim"))).balance_micros

    spent = 0
    n = 0

    async def spend_it_all() -> bool:
        nonlocal spent, n
        n += 1
        spent += (await survivor.authorize(f"after-{n}", "victim")).allowed
        return spent * CENT == left

    # Includes the lease: it comes back once it expires (LEASE_TTL_MS).
    await _eventually(spend_it_all, timeout_s=30)
    assert not (await survivor.authorize("one-more", "victim")).allowed
    await wait_until_flushed(app)  # the survivors' flushers took over the dead one's share
    for one in three[:2]:
        await _stop(one)
    await admin_channel.close(None)
    await wait_until_flushed(app)
    hot = await app.hot.read_account("victim")
    assert hot is not None
    assert hot.leased_micros == 0
    assert hot.balance_micros == 0
    assert await ledger_balance(app, "victim") == 0
