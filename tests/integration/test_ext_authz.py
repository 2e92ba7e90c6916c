"""Envoy's ext_authz Check on the proxies' port, driven by a gRPC client built from
xds-protos (Envoy itself is not installable here)."""

from __future__ import annotations

import json
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.conftest import RunningGate
from tests.helpers import fund_over_grpc, rid

CENT = 10_000
# What the route's configuration sets (deploy/envoy/envoy.yaml): the price of a request.
PRICED = {"x-balance-cost-micros": str(CENT)}


def _check(headers: dict[str, str], extensions: dict[str, str] | None = None) -> Any:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.headers.update(headers)
    request.attributes.context_extensions.update(extensions or {})
    return request


def _headers(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


async def _call(running: RunningGate, request: Any) -> Any:
    stub = external_auth_pb2_grpc.AuthorizationStub(running.gate_channel)
    return await stub.Check(request)


async def test_allowed_then_402_json_when_the_balance_cannot_pay(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "acme", 15_000)
    request = {"x-balance-account": "acme"}
    allowed = await _call(running, _check({**request, "x-request-id": rid()}, PRICED))
    denied = await _call(running, _check({**request, "x-request-id": rid()}, PRICED))

    assert allowed.status.code == grpc.StatusCode.OK.value[0]
    assert _headers(allowed.ok_response.headers)["x-balance-gate-balance-micros"] == "5000"
    assert denied.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert denied.denied_response.status.code == 402
    body = json.loads(denied.denied_response.body)
    assert body["error"]["code"] == "insufficient_balance"
    assert body["error"]["balance_micros"] == 5_000
    assert _headers(denied.denied_response.headers)["x-balance-gate-code"] == (
        "insufficient_balance"
    )


async def test_context_extensions_win_over_client_headers(running: RunningGate) -> None:
    """The route's configuration names the account and price; a client cannot override them."""
    await fund_over_grpc(running.admin, "acme", CENT)
    forged = {"x-balance-account": "victim", "x-balance-cost-micros": "0", "x-request-id": rid()}
    answer = await _call(
        running,
        _check(forged, {"x-balance-account": "acme", "x-balance-cost-micros": str(CENT)}),
    )
    assert answer.status.code == 0
    account = await running.app.hot.read_account("acme")
    assert account is not None
    assert account.balance_micros == 0


async def test_a_missing_account_is_400_naming_the_header(running: RunningGate) -> None:
    answer = await _call(running, _check({"x-request-id": rid()}, PRICED))
    assert answer.denied_response.status.code == 400
    error = json.loads(answer.denied_response.body)["error"]
    assert error["code"] == "invalid_request"
    assert "x-balance-account" in error["message"]


async def test_unknown_account_is_403_and_a_retry_is_not_charged_twice(
    running: RunningGate,
) -> None:
    unknown = await _call(
        running, _check({"x-balance-account": "nobody", "x-request-id": rid()}, PRICED)
    )
    assert unknown.denied_response.status.code == 403
    await fund_over_grpc(running.admin, "acme", CENT)
    same = {"x-balance-account": "acme", "x-request-id": rid()}
    first = await _call(running, _check(same, PRICED))
    retry = await _call(running, _check(same, PRICED))
    assert first.status.code == 0
    assert retry.status.code == 0  # a replay of the allowed decision
    account = await running.app.hot.read_account("acme")
    assert account is not None
    assert account.balance_micros == 0
