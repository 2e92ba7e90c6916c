"""Secrets never show: not in logs, client errors, metrics, reprs or settings errors.

Every secret below contains MARK. The sidecar runs with all of them for real:
Redis through an ACL user with a password, Postgres with a password in the DSN
(the test server trusts local connections, so it is accepted and ignored),
admin tokens from the environment and from a file, a payment gateway token and
an SMTP password (both servers unreachable, so their failure paths run too).
Then everything a person or a collector could read is searched for MARK.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pydantic
import pytest
import redis.asyncio as aioredis

from balance_gate.app import smtp_config
from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2, admin_pb2_grpc, gate_pb2_grpc
from tests.conftest import CLUSTER, Servers, serving
from tests.helpers import USD, authorize_request, rid, sidecar_env, wait_serving, with_settings

# A Redis ACL user with a password is set up on one standalone server.
pytestmark = pytest.mark.skipif(CLUSTER, reason="needs a standalone Redis")

MARK = "s3cr3t"
ADMIN_TOKEN = f"{MARK}-admin-env-0123456789"
FILE_TOKEN = f"{MARK}-admin-file-0123456789"
WRONG_TOKEN = f"{MARK}-wrong-token-0123456789"
REDIS_USER, REDIS_PASSWORD = "bg-secret-test", f"{MARK}-redis-password"
POSTGRES_PASSWORD = f"{MARK}-postgres-password"
PAYMENT_TOKEN = f"{MARK}-payment-gateway-token"
SMTP_PASSWORD = f"{MARK}-smtp-password"


def assert_no_secret(where: str, text: str) -> None:
    assert MARK not in text, f"a secret leaked into {where}: ...{_around(text)}..."


def _around(text: str) -> str:
    at = text.index(MARK)
    return text[max(0, at - 60) : at + 60]


def _with_password(dsn: str) -> str:
    scheme, rest = dsn.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{POSTGRES_PASSWORD}@{host}"


@pytest.fixture
async def secret_settings(
    settings: Settings, servers: Servers, redis_client: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Settings]:
    await redis_client.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", REDIS_USER, "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all"
    )
    token_file = tmp_path / "admin-tokens"
    token_file.write_text(f"# the next token\n{FILE_TOKEN}\n")
    closed = free_port()  # nothing listens here: the gateway and SMTP fail
    try:
        yield with_settings(
            settings,
            redis_url=f"redis://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{servers.standalone_redis.port}/0",
            database_url=_with_password(settings.database_url.get_secret_value()),
            admin_tokens=ADMIN_TOKEN,
            admin_token_file=str(token_file),
            payment_gateway="http",
            payment_gateway_url=f"http://127.0.0.1:{closed}",
            payment_gateway_token=PAYMENT_TOKEN,
            payment_gateway_retries=0,
            payment_gateway_timeout_ms=2_000,
            smtp_host="127.0.0.1",
            smtp_port=closed,
            smtp_username="billing",
            smtp_password=SMTP_PASSWORD,
            smtp_starttls=False,
            log_level="DEBUG",
        )
    finally:
        await redis_client.execute_command("ACL", "DELUSER", REDIS_USER)  # type: ignore[no-untyped-call]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


async def _exercise(admin_address: str, gate_address: str) -> list[str]:
    """Calls with no token, a wrong token, good ones and a failing top-up; the answers."""
    seen: list[str] = []
    good = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    async with (
        grpc.aio.insecure_channel(admin_address) as admin_channel,
        grpc.aio.insecure_channel(gate_address) as gate_channel,
    ):
        admin = admin_pb2_grpc.AdminStub(admin_channel)
        gate = gate_pb2_grpc.BalanceGateStub(gate_channel)
        for metadata in (None, (("authorization", f"Bearer {WRONG_TOKEN}"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.GetAccount(
                    admin_pb2.GetAccountRequest(account_id="x"), metadata=metadata
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            seen += [refused.value.details() or "", str(refused.value)]
        account = f"leaky-{rid()[:8]}"
        seen.append(
            str(
                await admin.CreateAccount(
                    admin_pb2.CreateAccountRequest(account_id=account), metadata=good
                )
            )
        )
        file_good = (("authorization", f"Bearer {FILE_TOKEN}"),)
        credit = admin_pb2.CreditRequest(
            account_id=account, amount_micros=USD, reason="funding", idempotency_key=rid()
        )
        seen.append(str(await admin.Credit(credit, metadata=file_good)))
        seen.append(str(await gate.Authorize(authorize_request(account, 1_000))))
        await admin.SetPaymentMethods(
            admin_pb2.SetPaymentMethodsRequest(account_id=account, primary="pm_card_visa"),
            metadata=good,
        )
        await admin.SetBillingEmail(
            admin_pb2.SetBillingEmailRequest(account_id=account, email="ops@example.com"),
            metadata=good,
        )
        # The payment gateway is unreachable: the top-up fails with the token in hand.
        top_up = admin_pb2.TopUpRequest(
            account_id=account, amount_micros=5 * USD, idempotency_key=rid()
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await admin.TopUp(top_up, metadata=good)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.details() == "payment gateway unavailable"
        seen += [failed.value.details() or "", str(failed.value)]
    return seen


async def test_secrets_stay_out_of_logs_errors_metrics_and_reprs(
    secret_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen = {
        "repr(settings)": repr(secret_settings),
        "str(settings)": str(secret_settings),
        "settings as JSON": secret_settings.model_dump_json(),
        "repr(smtp config)": repr(smtp_config(secret_settings)),
    }
    async with serving(secret_settings) as (sidecar, listening):
        seen["repr(app)"] = repr(sidecar.app)
        answers = await _exercise(
            f"127.0.0.1:{listening.admin_port}", f"127.0.0.1:{listening.gate_port}"
        )
        seen.update({f"answer {i}": text for i, text in enumerate(answers)})
        # An email to an unreachable SMTP server, with the password: it fails and says why.
        async with sidecar.app.pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO email_outbox (account_id, kind, to_address, subject, body)
                   SELECT account_id, 'top_up_failed', 'ops@example.com', 'hello', 'body'
                   FROM accounts LIMIT 1"""
            )
        assert await sidecar.app.emails.send_due() == 0
        errors = await sidecar.app.pool.fetch("SELECT last_error FROM email_outbox")
        assert any(row["last_error"] for row in errors)
        seen["email errors"] = repr([row["last_error"] for row in errors])
        seen["metrics"] = await asyncio.to_thread(_scrape, listening.metrics_port)
    seen["logs"] = caplog.text
    assert "UNAUTHENTICATED" in " ".join(answers)
    for where, text in seen.items():
        assert_no_secret(where, text)


def test_settings_errors_never_print_the_input(secret_settings: Settings) -> None:
    for broken in (
        {"payment_gateway_url": ""},  # a model check: pydantic would print every input
        {"admin_listen": "0.0.0.0:50052", "admin_tokens": "", "admin_token_file": ""},
        {"redis_key_prefix": "Not-Valid"},
        {"admin_tokens": f"{MARK}-short"},
    ):
        with pytest.raises(pydantic.ValidationError) as raised:
            with_settings(secret_settings, **broken)
        # str() is what a failed start prints; errors() keeps the input for code only.
        assert_no_secret(f"the error for {sorted(broken)}", str(raised.value))


def _run_child(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "balance_gate", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _child_env(secret_settings: Settings, ports: dict[str, int], **extra: str) -> dict[str, str]:
    values = {
        "admin_tokens": ADMIN_TOKEN,
        "admin_token_file": secret_settings.admin_token_file,
        "payment_gateway": "http",
        "payment_gateway_url": secret_settings.payment_gateway_url,
        "payment_gateway_token": PAYMENT_TOKEN,
        "payment_gateway_retries": "0",
        "smtp_host": "127.0.0.1",
        "smtp_port": str(secret_settings.smtp_port),
        "smtp_password": SMTP_PASSWORD,
        "smtp_username": "billing",
        "log_level": "DEBUG",
        **extra,
    }
    return sidecar_env(secret_settings, ports, **values)


async def test_a_sidecar_process_prints_no_secret(
    secret_settings: Settings, tmp_path: Path
) -> None:
    ports = {"gate": free_port(), "admin": free_port(), "metrics": free_port()}
    log = tmp_path / "serve.log"
    process = _run_child(_child_env(secret_settings, ports), log)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['admin']}") as channel:
            await wait_serving(channel, process)
        answers = await _exercise(f"127.0.0.1:{ports['admin']}", f"127.0.0.1:{ports['gate']}")
        metrics = await asyncio.to_thread(_scrape, ports["metrics"])
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert "serving" in output  # the log was captured at all
    for i, text in enumerate(answers):
        assert_no_secret(f"answer {i}", text)
    assert_no_secret("metrics", metrics)
    assert_no_secret("the process's output", output)


@pytest.mark.parametrize("broken", ["redis password", "postgres unreachable"])
async def test_a_failed_start_prints_no_secret(
    secret_settings: Settings, tmp_path: Path, broken: str
) -> None:
    """Start-up fails on a store; the traceback names the problem, not the password."""
    if broken == "redis password":
        wrong = secret_settings.redis_url.get_secret_value().replace(REDIS_PASSWORD, f"{MARK}-no")
        extra = {"redis_url": wrong}
    else:
        extra = {"database_url": f"postgresql://postgres:{POSTGRES_PASSWORD}@127.0.0.1:1/x"}
    ports = {"gate": free_port(), "admin": free_port(), "metrics": free_port()}
    env = _child_env(secret_settings, ports)
    env.update({f"BALANCE_GATE_{name.upper()}": value for name, value in extra.items()})
    log = tmp_path / "serve.log"
    process = _run_child(env, log)
    try:
        assert await asyncio.to_thread(process.wait, 60) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert "Error" in output  # it did fail, and said so
    assert_no_secret("the failed start's output", output)
