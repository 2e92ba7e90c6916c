"""Authorize for HTTP proxies: one decision, expressed as HTTP.

Shared by Envoy's ext_authz (ext_authz.py) and the plain HTTP endpoint for
nginx `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth` and HAProxy
(served here, `HttpAuthz`). The account, request id, cost and capability come
from the proxy's context (Envoy's `context_extensions`, trusted: set by the
proxy's own configuration) first, then from request headers, under names that
are settings (`AUTHZ_*_KEY`).

A decision maps to an HTTP status: allowed 200; insufficient_balance 402;
rate_limited 429; unavailable 503; any other denial 403; bad input 400.
Denials carry a JSON body {"error": {"code", "message", "balance_micros"}} and
the header x-balance-gate-code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from balance_gate import errors
from balance_gate.connection_limits import ConnectionLimits, GuardedHttpServer
from balance_gate.constants import DenyCode
from balance_gate.gate import Decision, Gate
from balance_gate.settings import Settings

log = logging.getLogger(__name__)

CODE_HEADER = "x-balance-gate-code"
BALANCE_HEADER = "x-balance-gate-balance-micros"
LOW_BALANCE_HEADER = "x-balance-gate-low-balance"
SHADOW_HEADER = "x-balance-gate-shadow"

_STATUS = {
    DenyCode.INSUFFICIENT_BALANCE: 402,
    DenyCode.RATE_LIMITED: 429,
    DenyCode.UNAVAILABLE: 503,
}
_MESSAGES = {
    DenyCode.INSUFFICIENT_BALANCE: "the balance cannot pay for this request",
    DenyCode.ACCOUNT_NOT_FOUND: "no such account",
    DenyCode.ACCOUNT_DISABLED: "the account is disabled",
    DenyCode.CAPABILITY_BLOCKED: "this capability is blocked by the credit line's stop-loss",
    DenyCode.RATE_LIMITED: "too many requests under the credit line's stop-loss",
    DenyCode.UNAVAILABLE: "the balance gate cannot decide right now",
}


@dataclass(frozen=True)
class AuthzKeys:
    """Header names, which are also the context_extensions keys."""

    account: str
    request_id: str
    cost: str
    capability: str
    default_cost_micros: int

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthzKeys:
        return cls(
            settings.authz_account_key.lower(),
            settings.authz_request_id_key.lower(),
            settings.authz_cost_key.lower(),
            settings.authz_capability_key.lower(),
            settings.authz_default_cost_micros,
        )


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: str = ""


async def decide(
    gate: Gate,
    keys: AuthzKeys,
    headers: Mapping[str, str],
    context: Mapping[str, str],
    may_debit: Callable[[str], None] | None = None,
) -> HttpAnswer:
    """Authorize one HTTP request; `headers` have lowercase names.

    may_debit(account_id) raises PermissionDenied when the calling proxy may not
    debit that account (proxy identities, docs/security.md).
    """
    try:
        account_id = _field(keys.account, headers, context)
        if may_debit is not None:
            may_debit(account_id)
        request_id = _field(keys.request_id, headers, context)
        cost = _cost(keys, headers, context)
        capability = context.get(keys.capability, headers.get(keys.capability, ""))
        decision = await gate.authorize(account_id, request_id, cost, capability)
    except errors.InvalidArgument as exc:
        return _error(400, "invalid_request", str(exc))
    except errors.PermissionDenied as exc:
        return _error(403, "permission_denied", str(exc))
    except errors.FailedPrecondition as exc:
        return _error(409, "request_conflict", str(exc))
    except errors.Unavailable as exc:
        return _error(503, DenyCode.UNAVAILABLE, str(exc))
    return answer_for(decision)


def _field(key: str, headers: Mapping[str, str], context: Mapping[str, str]) -> str:
    value = context.get(key) or headers.get(key)
    if not value:
        raise errors.InvalidArgument(key, "is required (request header or context extension)")
    return value


def _cost(keys: AuthzKeys, headers: Mapping[str, str], context: Mapping[str, str]) -> int:
    raw = context.get(keys.cost) or headers.get(keys.cost)
    if raw is None:
        return keys.default_cost_micros
    if not raw.isdigit() or len(raw) > 16:
        raise errors.InvalidArgument(keys.cost, "must be a whole number of micro-USD")
    return int(raw)


def answer_for(decision: Decision) -> HttpAnswer:
    headers = {BALANCE_HEADER: str(decision.balance_micros)}
    if decision.allowed:
        if decision.low_balance:
            headers[LOW_BALANCE_HEADER] = "1"
        if decision.shadow:
            headers[SHADOW_HEADER] = decision.code
        return HttpAnswer(200, headers)
    answer = _error(
        _STATUS.get(decision.code, 403),
        decision.code,
        _MESSAGES.get(decision.code, decision.code),
        decision.balance_micros,
    )
    answer.headers.update(headers)
    return answer


def _error(status: int, code: str, message: str, balance_micros: int | None = None) -> HttpAnswer:
    error: dict[str, object] = {"code": code, "message": message}
    if balance_micros is not None:
        error["balance_micros"] = balance_micros
    return HttpAnswer(
        status,
        {CODE_HEADER: code, "content-type": "application/json"},
        json.dumps({"error": error}),
    )


class HttpAuthz:
    """The plain HTTP endpoint: any path, any method; 2xx allows, 403 denies.

    Subrequest-based proxies (nginx auth_request) understand only 2xx, 401 and
    403 from the auth server, so every denial is 403 here, with the code in
    x-balance-gate-code for the proxy to turn into the client's answer
    (deploy/nginx/ turns insufficient_balance into a 402 JSON error).
    """

    def __init__(self, gate: Gate, keys: AuthzKeys, *, connection_limits: ConnectionLimits) -> None:
        self._gate = gate
        self._keys = keys
        self._connection_limits = connection_limits
        self._runner: web.BaseRunner | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool) -> int:
        """Serve on host:port (0: any free port); return the port."""
        # Any path, any method; connections capped, slow headers cut (connection_limits).
        server = GuardedHttpServer(self._handle, self._connection_limits, access_log=None)
        self._runner = web.ServerRunner(server)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None).start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        answer = await decide(self._gate, self._keys, headers, {})
        status = answer.status if answer.status < 300 else 403
        return web.Response(status=status, headers=answer.headers, text=answer.body)
