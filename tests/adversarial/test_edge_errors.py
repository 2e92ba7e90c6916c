"""Issue 12 items 6 and 8: what reaches the edges can only be refused cleanly.

Each edge (gRPC, Envoy ext_authz, the HTTP endpoint) answers a failure from one
table (status.py): never gRPC UNKNOWN, never HTTP 500, and a header that is not
what it claims to be (a superscript digit, Arabic-Indic digits, bytes that are
not UTF-8, a control character, two copies) is a 400 naming the header.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from balance_gate.constants import HOT_SHARD_LOCK_CLASS
from balance_gate.keys import shard_of
from balance_gate.settings import Settings
from balance_gate.v1 import gate_pb2
from tests.conftest import RunningGate, running_gate
from tests.helpers import fund, rid, with_settings

CENT = 10_000
PRICED = {"x-balance-cost-micros": str(CENT)}


@pytest.fixture
async def edge(settings: Settings) -> AsyncIterator[RunningGate]:
    """A sidecar with the HTTP endpoint on, and a 300 ms Postgres statement timeout."""
    changed = with_settings(settings, http_authz_listen="127.0.0.1:0", database_timeout_ms=300)
    async with running_gate(changed) as gate:
        yield gate


async def _raw_http(port: int, header_lines: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    """One GET with these exact header bytes; (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"GET /authorize HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n"
        writer.write(head + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, body


def _http_lines(account: str, cost: bytes) -> list[bytes]:
    return [
        b"X-Balance-Account: " + account.encode(),
        b"X-Request-Id: " + rid().encode(),
        b"X-Balance-Cost-Micros: " + cost,
    ]


@pytest.mark.parametrize(
    "cost",
    [
        "\u00b2".encode(),  # superscript two: str.isdigit() is True for it; int() raises
        "\u0661\u0660".encode(),  # Arabic-Indic 10: int() reads it as a number
        "\uff11\uff10".encode(),  # fullwidth 10
        b"\xff\xfe10",  # not UTF-8 at all
    ],
    ids=["superscript", "arabic-indic", "fullwidth", "not-utf8"],
)
async def test_a_cost_header_that_is_not_ascii_digits_is_400_naming_it(
    edge: RunningGate, cost: bytes
) -> None:
    """Issue 12 item 6: before, a superscript two answered 500 and Arabic-Indic digits
    were read as a number and debited."""
    await fund(edge.app, "acme", CENT)
    assert edge.listening.http_authz_port is not None
    status, headers, body = await _raw_http(
        edge.listening.http_authz_port, _http_lines("acme", cost)
    )
    # The HTTP endpoint answers every denial 403 (nginx auth_request), with the code.
    assert (status, headers.get("x-balance-gate-code")) == (403, "invalid_request"), body
    assert "x-balance-cost-micros" in json.loads(body)["error"]["message"]
    account = await edge.app.hot.read_account("acme")
    assert account is not None
    assert account.balance_micros == CENT


async def test_a_control_byte_in_a_header_is_400_naming_it(edge: RunningGate) -> None:
    """aiohttp's parser refuses it before the gate sees it: a 400 that quotes the header."""
    assert edge.listening.http_authz_port is not None
    lines = _http_lines("acme", b"10\x01")
    status, _, body = await _raw_http(edge.listening.http_authz_port, lines)
    assert status == 400
    assert b"X-Balance-Cost-Micros" in body


async def test_an_account_header_that_is_not_utf8_is_400_naming_it(edge: RunningGate) -> None:
    """Issue 12 item 6: before, bytes that are not UTF-8 ended in UnicodeEncodeError (500)."""
    assert edge.listening.http_authz_port is not None
    lines = [b"X-Balance-Account: acme\xff", b"X-Request-Id: r1", b"X-Balance-Cost-Micros: 1"]
    status, headers, body = await _raw_http(edge.listening.http_authz_port, lines)
    assert (status, headers.get("x-balance-gate-code")) == (403, "invalid_request"), body
    assert "x-balance-account" in json.loads(body)["error"]["message"]


async def test_two_copies_of_a_header_the_gate_reads_are_refused(edge: RunningGate) -> None:
    """A proxy that appends its header after the client's must not let the client's win."""
    await fund(edge.app, "victim", CENT)
    await fund(edge.app, "acme", CENT)
    assert edge.listening.http_authz_port is not None
    lines = [b"X-Balance-Account: victim", *_http_lines("acme", b"10000")]
    status, headers, _ = await _raw_http(edge.listening.http_authz_port, lines)
    assert (status, headers.get("x-balance-gate-code")) == (403, "invalid_request")
    for account_id in ("victim", "acme"):
        account = await edge.app.hot.read_account(account_id)
        assert account is not None
        assert account.balance_micros == CENT


async def _cold_account_with_postgres_stuck(edge: RunningGate) -> asyncpg.Connection[Any]:
    """An account in the ledger but not in Redis, and its shard lock held elsewhere, so
    loading it runs into the statement timeout. Returns the connection holding the lock."""
    await edge.app.pool.execute(
        "INSERT INTO accounts (account_id, currency) VALUES ('cold', 'USD')"
    )
    holder = await asyncpg.connect(str(edge.app.settings.database_url.get_secret_value()))
    await holder.execute("SELECT pg_advisory_lock($1, $2)", HOT_SHARD_LOCK_CLASS, shard_of("cold"))
    return holder


async def test_postgres_failing_during_a_cold_load_is_503_on_every_edge(
    edge: RunningGate,
) -> None:
    """Issue 12 item 8: before, ext_authz answered gRPC UNKNOWN and the HTTP endpoint 500."""
    holder = await _cold_account_with_postgres_stuck(edge)
    try:
        stub = external_auth_pb2_grpc.AuthorizationStub(edge.gate_channel)
        check = external_auth_pb2.CheckRequest()
        check.attributes.request.http.headers.update(
            {"x-balance-account": "cold", "x-request-id": rid()}
        )
        check.attributes.context_extensions.update(PRICED)
        answer = await stub.Check(check)
        assert answer.denied_response.status.code == 503
        assert json.loads(answer.denied_response.body)["error"]["code"] == "unavailable"

        assert edge.listening.http_authz_port is not None
        status, headers, _ = await _raw_http(
            edge.listening.http_authz_port, _http_lines("cold", b"10000")
        )
        assert (status, headers.get("x-balance-gate-code")) == (403, "unavailable")

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await edge.gate.Authorize(
                gate_pb2.AuthorizeRequest(account_id="cold", request_id=rid(), amount_micros=CENT)
            )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await holder.close()
