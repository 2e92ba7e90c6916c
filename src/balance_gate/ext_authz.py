"""Envoy's external authorization API on the proxies' port.

envoy.service.auth.v3.Authorization/Check, as used by Envoy, Istio and other
Envoy-based gateways (stubs from the xds-protos package). The decision and its
HTTP form come from http_authz: an allow adds the x-balance-gate-* headers to
the upstream request; a denial answers the client itself (402 JSON for
insufficient_balance, 403/429/503 for the others). docs/envoy.md has the
Envoy configuration and how failure_mode_allow combines with REDIS_FAIL_MODE.
"""

from __future__ import annotations

from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import (
    external_auth_pb2,
    external_auth_pb2_grpc,
)

from balance_gate import decoding
from balance_gate.auth import ProxyIdentities
from balance_gate.gate import Gate
from balance_gate.http_authz import AuthzKeys, HttpAnswer, decide

SERVICE_NAME = "envoy.service.auth.v3.Authorization"

_OK = 0
_PERMISSION_DENIED = 7


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, gate: Gate, keys: AuthzKeys, identities: ProxyIdentities) -> None:
        self._gate = gate
        self._keys = keys
        self._identities = identities

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        attributes = request.attributes
        headers = {k.lower(): v for k, v in attributes.request.http.headers.items()}
        answer = await decide(
            self._gate,
            self._keys,
            headers,
            dict(attributes.context_extensions),
            lambda account_id: self._identities.check(context, account_id),
        )
        return check_response(answer)


def check_response(answer: HttpAnswer) -> Any:
    options = [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
        for key, value in answer.headers.items()
    ]
    response = external_auth_pb2.CheckResponse()
    if answer.status == 200:
        response.status.code = _OK
        response.ok_response.headers.extend(options)
        return response
    response.status.code = _PERMISSION_DENIED
    denied = response.denied_response
    denied.status.code = answer.status
    denied.headers.extend(options)
    denied.body = answer.body
    return response


def add_to_server(
    server: grpc.aio.Server, gate: Gate, keys: AuthzKeys, identities: ProxyIdentities
) -> None:
    # decoding: a CheckRequest that does not parse is INVALID_ARGUMENT, not UNKNOWN.
    decoding.add_servicer(
        ExtAuthzServicer(gate, keys, identities),
        server,
        external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"],
    )
