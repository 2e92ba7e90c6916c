"""Issue 12: Hypothesis fuzzes Envoy's Check and the HTTP endpoint, raw header bytes included.

Every answer is a clean one from status.py's table: Check always answers a
CheckResponse (a gRPC error would let Envoy's failure_mode_allow serve the
request), never a 500 inside it; the HTTP endpoint never answers 500 and keeps
serving. Funded accounts whose ids the generator cannot produce never move.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from balance_gate.settings import Settings
from tests.conftest import RunningGate, running_gate
from tests.helpers import USD, fund, with_settings

UNNAMEABLE = "\u2042"  # generated text never holds it (see _text)
FUNDED = {f"funded{UNNAMEABLE}{n}": (n + 1) * USD for n in range(2)}
TARGET = "fuzz-target"
KEYS = ["x-balance-account", "x-request-id", "x-balance-cost-micros", "x-balance-capability"]
CLEAN_HTTP = {200, 400, 401, 402, 403, 404, 409, 429, 503}

_text = st.text(st.characters(codec="utf-8", exclude_characters=UNNAMEABLE), max_size=40)
# Characters that look like what they are not: digits str.isdigit() accepts and int()
# reads or refuses, a sign, spaces, controls.
_tricky = st.lists(
    st.sampled_from(["\u00b2", "\u0661", "\uff11", "\u0e51", "-", "+", " ", "\t", "1", "0"]),
    min_size=1,
    max_size=6,
).map("".join)
_keys = st.one_of(st.sampled_from([*KEYS, "x-balance-gate-proxy-secret", "host"]), _text)
_plausible = st.one_of(
    st.just(TARGET),
    st.integers(0, 10**18).map(str),
    st.uuids().map(str),
    _text,
)
_values = st.one_of(_plausible, _tricky, _text)


@pytest.fixture
async def edges(settings: Settings) -> AsyncIterator[RunningGate]:
    async with running_gate(with_settings(settings, http_authz_listen="127.0.0.1:0")) as gate:
        for account_id, micros in FUNDED.items():
            await fund(gate.app, account_id, micros)
        await fund(gate.app, TARGET, USD)
        yield gate


async def _funded_unmoved(gate: RunningGate) -> None:
    for account_id, micros in FUNDED.items():
        account = await gate.app.hot.read_account(account_id)
        assert account is not None
        assert account.balance_micros == micros


_ids = st.one_of(st.uuids().map(str), _text)
_costs = st.one_of(st.integers(0, 20_000).map(str), _tricky, _text)
# Half the examples name a real account and a plausible price, to reach the core.
_complete = st.fixed_dictionaries(
    {"x-balance-account": st.just(TARGET), "x-request-id": _ids, "x-balance-cost-micros": _costs}
)


def _check_request(draw: Any) -> Any:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    if draw(st.booleans()):
        complete = draw(_complete)
        request.attributes.context_extensions["x-balance-cost-micros"] = complete.pop(
            "x-balance-cost-micros"
        )
        http.headers.update(complete)
    http.headers.update(draw(st.dictionaries(_keys, _values, max_size=6)))
    for key, raw in draw(st.lists(st.tuples(_keys, st.binary(max_size=40)), max_size=4)):
        http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=raw))
    request.attributes.context_extensions.update(draw(st.dictionaries(_keys, _values, max_size=4)))
    return request


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_check_always_answers_a_clean_check_response(
    edges: RunningGate, data: st.DataObject
) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(edges.gate_channel)
    answer = await stub.Check(_check_request(data.draw), timeout=30)
    event(str(answer.denied_response.status.code or "ok"))
    assert answer.status.code in (0, 7), answer
    if answer.status.code:
        assert answer.denied_response.status.code in CLEAN_HTTP, answer
        assert json.loads(answer.denied_response.body)["error"]["code"]
    await _funded_unmoved(edges)


_header_bytes = st.one_of(
    st.binary(max_size=40),
    _tricky.map(str.encode),
    st.sampled_from([TARGET.encode() + b"\xff", b"\xc3", b"\xed\xa0\x80", b"caf\xe9"]),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_name_bytes = st.one_of(st.sampled_from([k.encode() for k in KEYS]), _header_bytes)


async def _raw_request(port: int, lines: list[tuple[bytes, bytes]]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"GET /authorize HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n"
        writer.write(head + b"".join(k + b": " + v + b"\r\n" for k, v in lines) + b"\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    return int(status_line.split()[1])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    complete=st.one_of(st.none(), _complete),
    lines=st.lists(st.tuples(_name_bytes, _header_bytes), max_size=6),
)
async def test_the_http_endpoint_never_answers_500_to_raw_header_bytes(
    edges: RunningGate, complete: dict[str, str] | None, lines: list[tuple[bytes, bytes]]
) -> None:
    assert edges.listening.http_authz_port is not None
    encoded = [
        (k.encode(), v.encode("utf-8", "surrogatepass")) for k, v in (complete or {}).items()
    ]
    lines = encoded + lines
    status = await _raw_request(edges.listening.http_authz_port, lines)
    event(str(status))
    assert status in CLEAN_HTTP, (status, lines)
    # Still serving, and nobody else's money moved.
    healthy = await _raw_request(edges.listening.http_authz_port, [])
    assert healthy == 403  # no account named: refused by the gate, not by a crash
    await _funded_unmoved(edges)
