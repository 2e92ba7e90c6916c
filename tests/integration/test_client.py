"""balance_gate.client against a real sidecar: one stream, exact debits, fail modes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from balance_gate.client import (
    Conflict,
    Connection,
    Decision,
    GateClient,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import RunningGate, serving
from tests.faults.processes import SidecarProcess
from tests.helpers import USD, fund_over_grpc, mutual_tls_files, rid, with_settings


def gate_address(running: RunningGate) -> str:
    return f"127.0.0.1:{running.listening.gate_port}"


async def balance(admin: admin_pb2_grpc.AdminAsyncStub, account_id: str) -> int:
    account = await admin.GetAccount(admin_pb2.GetAccountRequest(account_id=account_id))
    return account.balance_micros


async def test_concurrent_calls_share_one_stream_and_debit_exactly(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "acme", 10 * USD)
    async with GateClient(gate_address(running), deadline_s=30) as gate:
        decisions = await asyncio.gather(
            *(gate.authorize("acme", f"r-{i}", 1_000, capability="small") for i in range(1_000))
        )
        assert gate.streams_opened == 1
    assert all(d.allowed and d.decided and not d.replayed for d in decisions)
    assert {d.request_id for d in decisions} == {f"r-{i}" for i in range(1_000)}
    assert await balance(running.admin, "acme") == 10 * USD - 1_000 * 1_000


async def test_denials_replays_and_duplicates(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "acme", 5_000)
    async with GateClient(gate_address(running), deadline_s=10) as gate:
        denied = await gate.authorize("acme", "big", 6_000)
        assert denied == Decision(False, "insufficient_balance", 5_000, False, "big")
        assert (await gate.authorize("ghost", "r-1", 1)).code == "account_not_found"

        first = await gate.authorize("acme", "r-1", 1_000)
        assert first.allowed
        assert not first.replayed
        assert first.balance_micros == 4_000
        again = await gate.authorize("acme", "r-1", 1_000)
        assert again.allowed
        assert again.replayed
        assert again.balance_micros == 4_000

        # The same request_id twice at once: one request on the stream, one debit.
        twins = await asyncio.gather(
            gate.authorize("acme", "twin", 1_000), gate.authorize("acme", "twin", 1_000)
        )
        assert twins[0] == twins[1]
        assert twins[0].allowed
        assert not twins[0].replayed
        assert await balance(running.admin, "acme") == 3_000


async def test_bad_input_raises_typed_errors(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "acme", USD)
    async with GateClient(gate_address(running), deadline_s=10) as gate:
        with pytest.raises(InvalidRequest) as empty:
            await gate.authorize("", "r-1", 1_000)
        assert empty.value.field == "account_id"
        assert "must not be empty" in empty.value.message
        with pytest.raises(InvalidRequest) as negative:
            await gate.authorize("acme", "r-1", -1)
        assert negative.value.field == "amount_micros"

        await gate.authorize("acme", "r-2", 1_000)
        with pytest.raises(Conflict, match="different amount_micros"):
            await gate.authorize("acme", "r-2", 2_000)
        # The stream survived every one of those errors.
        assert (await gate.authorize("acme", "r-3", 1_000)).allowed
        assert gate.streams_opened == 1


async def test_settle(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "acme", USD)
    async with GateClient(gate_address(running), deadline_s=10) as gate:
        await gate.authorize("acme", "r-1", 10_000)
        settled = await gate.settle("acme", "r-1", 7_500)
        assert (settled.delta_micros, settled.balance_micros) == (-2_500, USD - 7_500)
        assert not settled.replayed
        assert (await gate.settle("acme", "r-1", 7_500)).replayed
        with pytest.raises(Conflict, match="already settled"):
            await gate.settle("acme", "r-1", 9_000)
        with pytest.raises(NotFound):
            await gate.settle("acme", "never-seen", 1)
        with pytest.raises(InvalidRequest) as bad:
            await gate.settle("acme", "", 1)
        assert bad.value.field == "request_id"


async def test_deadlines_answer_by_the_fail_mode_and_a_retry_is_safe(
    running: RunningGate,
) -> None:
    await fund_over_grpc(running.admin, "acme", USD)
    async with GateClient(gate_address(running), deadline_s=1e-6) as gate:
        late = await gate.authorize("acme", "r-1", 1_000)
        assert (late.allowed, late.code, late.decided) == (False, "unavailable", False)
        assert late.detail == "deadline exceeded"
        # The per-call deadline overrides the default. Whether or not the late
        # request reached the gate, retrying its request_id debits it once.
        retried = await gate.authorize("acme", "r-1", 1_000, deadline_s=10)
        assert retried.allowed
        assert retried.decided
    assert await balance(running.admin, "acme") == USD - 1_000


@pytest.mark.parametrize(
    ("fail_mode", "allowed", "code"),
    [("fail_closed", False, "unavailable"), ("fail_open", True, "")],
)
async def test_an_unreachable_sidecar_gets_the_fail_mode(
    fail_mode: str, allowed: bool, code: str
) -> None:
    closed_port = free_port()
    async with GateClient(
        f"127.0.0.1:{closed_port}",
        fail_mode="fail_open" if fail_mode == "fail_open" else "fail_closed",
        deadline_s=5,
    ) as gate:
        started = time.monotonic()
        answers = await asyncio.gather(*(gate.authorize("acme", rid(), 1_000) for _ in range(10)))
        for answer in answers:
            assert (answer.allowed, answer.code, answer.decided) == (allowed, code, False)
            assert answer.failed_open is allowed
            assert answer.balance_micros == 0
        # A refused connection answers at once, not at the deadline.
        assert time.monotonic() - started < 4
        with pytest.raises(Unavailable):
            await gate.settle("acme", "r-1", 1_000, deadline_s=1)


async def test_the_stream_reopens_after_the_sidecar_restarts(
    settings: Settings, tmp_path: Path
) -> None:
    sidecar = SidecarProcess(settings, tmp_path / "sidecar.log")
    try:
        await sidecar.start()
        admin = admin_pb2_grpc.AdminStub(sidecar.admin_channel)
        await fund_over_grpc(admin, "acme", USD)
        async with GateClient(f"127.0.0.1:{sidecar.ports['gate']}", deadline_s=5) as gate:
            assert (await gate.authorize("acme", "before", 1_000)).allowed
            sidecar.kill()
            down = await gate.authorize("acme", "while-down", 1_000)
            assert (down.allowed, down.decided) == (False, False)

            await sidecar.start()
            deadline = time.monotonic() + 30
            while not (after := await gate.authorize("acme", "after", 1_000)).decided:
                assert time.monotonic() < deadline, after
                await asyncio.sleep(0.05)
            assert after.allowed
            assert not after.replayed
            assert gate.streams_opened >= 2
            # The request of the broken stream is decided afresh, once.
            assert (await gate.authorize("acme", "while-down", 1_000)).allowed
        assert await balance(admin, "acme") == USD - 3_000
    finally:
        await sidecar.close()


async def test_mutual_tls(settings: Settings, tmp_path: Path) -> None:
    files, cert, key = mutual_tls_files(tmp_path, "proxy")
    async with serving(with_settings(settings, **files)) as (sidecar, listening):
        await sidecar.app.accounts.create("acme", "USD")
        await sidecar.app.accounts.credit("acme", USD, "test funding", rid())
        connection = Connection(
            f"127.0.0.1:{listening.gate_port}",
            ca_file=files["tls_client_ca_file"],
            cert_file=cert,
            key_file=key,
        )
        async with GateClient(connection, deadline_s=10) as gate:
            assert (await gate.authorize("acme", "r-1", 1_000)).allowed
        # Without a client certificate the handshake fails: the fail mode answers.
        plain_tls = Connection(connection.target, ca_file=files["tls_client_ca_file"])
        async with GateClient(plain_tls, deadline_s=5) as gate:
            refused = await gate.authorize("acme", "r-2", 1_000)
            assert (refused.allowed, refused.decided) == (False, False)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="fail_mode"):
        GateClient("127.0.0.1:1", fail_mode="open")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deadline_s"):
        GateClient("127.0.0.1:1", deadline_s=0)
    with pytest.raises(ValueError, match="key_file"):
        Connection("127.0.0.1:1", ca_file="ca.pem", cert_file="c.pem")
    assert "secret" not in repr(Connection("127.0.0.1:1", token="secret-token-0123456789"))
