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

from balance_gate import decoding, errors
from balance_gate.auth import ProxyIdentities
from balance_gate.gate import Gate
from balance_gate.http_authz import Asked, AuthzKeys, HttpAnswer, decide, error_answer
from balance_gate.status import status_of

SERVICE_NAME = "envoy.service.auth.v3.Authorization"

_OK = 0
_PERMISSION_DENIED = 7


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, gate: Gate, keys: AuthzKeys, identities: ProxyIdentities) -> None:
        self._gate = gate
        self._keys = keys
        self._identities = identities

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """Always a CheckResponse: a gRPC error would let Envoy's failure_mode_allow serve
        the request for free, so every failure is a denial from status.py's table."""
        try:
            attributes = request.attributes
            asked = Asked(
                _headers(attributes.request.http),
                dict(attributes.context_extensions),
                price_from_headers=self._keys.ext_authz_header_price,
            )
            answer = await decide(
                self._gate,
                self._keys,
                asked,
                lambda account_id: self._identities.check(context, account_id),
                component="Check",
            )
        except Exception as exc:  # noqa: BLE001 - a denial, never UNKNOWN
            status = status_of(exc, "Check")
            answer = error_answer(status.http_status, status.code, status.message)
        return check_response(answer)


def _headers(http: Any) -> dict[str, str]:
    """Lowercase header names to values: the `headers` map, or Envoy's raw `header_map`
    (encode_raw_headers), whose bytes must be UTF-8. A repeated header is refused."""
    headers = {key.lower(): value for key, value in http.headers.items()}
    for entry in http.header_map.headers:
        key = entry.key.lower()
        if key in headers:
            raise errors.InvalidArgument(key, "must appear once")
        try:
            headers[key] = entry.raw_value.decode("utf-8") if entry.raw_value else entry.value
        except UnicodeDecodeError:
            raise errors.InvalidArgument(key, "must be valid UTF-8") from None
    return headers


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
