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

import hashlib
import hmac
import json
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from balance_gate import errors
from balance_gate.auth import ProxyIdentities
from balance_gate.connection_limits import ConnectionLimits, GuardedHttpServer
from balance_gate.constants import DenyCode
from balance_gate.gate import Decision, Gate
from balance_gate.settings import Settings
from balance_gate.status import status_of

log = logging.getLogger(__name__)

# ASCII digits only (str.isdigit also accepts '²' and Arabic-Indic digits), at most
# 16 of them: every amount the gate accepts has fewer.
_DIGITS = re.compile(r"[0-9]{1,16}")
# C0 and C1 control characters and DEL: never part of an id, a price or a capability.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

CODE_HEADER = "x-balance-gate-code"
BALANCE_HEADER = "x-balance-gate-balance-micros"
LOW_BALANCE_HEADER = "x-balance-gate-low-balance"
SHADOW_HEADER = "x-balance-gate-shadow"
# The HTTP endpoint's proxy secret (HTTP_AUTHZ_SECRET), sent by the proxy on every request.
PROXY_SECRET_HEADER = "x-balance-gate-proxy-secret"

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
    """Header names, which are also the context_extensions keys, and where a price may come from."""

    account: str
    request_id: str
    cost: str
    capability: str
    default_cost_micros: int | None  # None: a request that names no cost is refused
    # ext_authz: read cost and capability from request headers too, not only from the
    # route's context_extensions (off: a client header can never set its own price).
    ext_authz_header_price: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthzKeys:
        return cls(
            settings.authz_account_key.lower(),
            settings.authz_request_id_key.lower(),
            settings.authz_cost_key.lower(),
            settings.authz_capability_key.lower(),
            settings.authz_default_cost_micros,
            settings.ext_authz_header_price,
        )


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: str = ""


@dataclass(frozen=True)
class Asked:
    """One HTTP request as the edge received it: headers (lowercase names) and the proxy's
    own context. `price_from_headers`: whether cost and capability may come from headers
    (the HTTP endpoint, whose headers the proxy sets) or only from the context (ext_authz).
    """

    headers: Mapping[str, str]
    context: Mapping[str, str]
    price_from_headers: bool


async def decide(
    gate: Gate,
    keys: AuthzKeys,
    asked: Asked,
    may_debit: Callable[[str], None] | None = None,
    component: str = "http_authz",
) -> HttpAnswer:
    """Authorize one HTTP request; every failure is an answer from status.py's table.

    may_debit(account_id) raises PermissionDenied when the calling proxy may not
    debit that account (proxy identities, docs/security.md).
    """
    try:
        account_id = _required(keys.account, asked.headers, asked.context)
        if may_debit is not None:
            may_debit(account_id)
        request_id = _required(keys.request_id, asked.headers, asked.context)
        cost = _cost(keys, asked)
        capability = _priced(keys.capability, asked) or ""
        decision = await gate.authorize(account_id, request_id, cost, capability)
    except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a 500
        status = status_of(exc, component)
        return error_answer(status.http_status, status.code, status.message)
    return answer_for(decision)


def _value(key: str, headers: Mapping[str, str], context: Mapping[str, str]) -> str | None:
    """The context's value (set by the proxy's configuration) first, then the header's."""
    value = context.get(key) or headers.get(key)
    if value is None:
        return None
    if _UNSAFE.search(value):
        raise errors.InvalidArgument(key, "must not contain control characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # aiohttp keeps undecodable bytes as surrogates
            raise errors.InvalidArgument(key, "must be valid UTF-8") from None
    return value


def _required(key: str, headers: Mapping[str, str], context: Mapping[str, str]) -> str:
    value = _value(key, headers, context)
    if not value:
        raise errors.InvalidArgument(key, "is required (request header or context extension)")
    return value


def _priced(key: str, asked: Asked) -> str | None:
    """A value that sets what the request costs: from headers only where they are trusted."""
    return _value(key, asked.headers if asked.price_from_headers else {}, asked.context)


def _cost(keys: AuthzKeys, asked: Asked) -> int:
    raw = _priced(keys.cost, asked)
    if raw is None:
        if keys.default_cost_micros is None:
            where = "header" if asked.price_from_headers else "route context_extensions"
            raise errors.InvalidArgument(keys.cost, f"is required (set it in the {where})")
        return keys.default_cost_micros
    if not _DIGITS.fullmatch(raw):
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
    answer = error_answer(
        _STATUS.get(decision.code, 403),
        decision.code,
        _MESSAGES.get(decision.code, decision.code),
        decision.balance_micros,
    )
    answer.headers.update(headers)
    return answer


def error_answer(
    status: int, code: str, message: str, balance_micros: int | None = None
) -> HttpAnswer:
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
    (deploy/nginx/ turns insufficient_balance into a 402 JSON error). A caller
    without the proxy secret (when one is set) gets 401.
    """

    def __init__(
        self,
        gate: Gate,
        keys: AuthzKeys,
        *,
        proxy_secret: str = "",
        ssl_context: ssl.SSLContext | None = None,
        identities: ProxyIdentities | None = None,
        connection_limits: ConnectionLimits,
    ) -> None:
        self._gate = gate
        self._keys = keys
        # Only a digest is kept: compared in constant time, never logged.
        self._secret_digest = _digest(proxy_secret) if proxy_secret else None
        self._ssl_context = ssl_context
        # With mutual TLS: which proxy certificate may debit which accounts (auth.py).
        self._identities = identities or ProxyIdentities({})
        self._read = (keys.account, keys.request_id, keys.cost, keys.capability)
        self._connection_limits = connection_limits
        self._runner: web.BaseRunner | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool) -> int:
        """Serve on host:port (0: any free port); return the port."""
        # Any path, any method; connections capped, slow headers cut (connection_limits).
        server = GuardedHttpServer(self._handle, self._connection_limits, access_log=None)
        self._runner = web.ServerRunner(server)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host,
            port,
            reuse_port=reuse_port or None,
            ssl_context=self._ssl_context,
        )
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        answer = self._refusal(request)
        if answer is None:
            headers = {name.lower(): value for name, value in request.headers.items()}
            asked = Asked(headers, {}, price_from_headers=True)
            answer = await decide(self._gate, self._keys, asked, self._may_debit(request))
        status = answer.status if answer.status < 300 or answer.status == 401 else 403
        return web.Response(status=status, headers=answer.headers, text=answer.body)

    def _refusal(self, request: web.BaseRequest) -> HttpAnswer | None:
        """Why this request is not even decided: no proxy secret, or a repeated header."""
        if self._secret_digest is not None:
            presented = request.headers.get(PROXY_SECRET_HEADER, "")
            if not hmac.compare_digest(_digest(presented), self._secret_digest):
                return error_answer(
                    401, "proxy_unauthenticated", f"{PROXY_SECRET_HEADER}: missing or not valid"
                )
        for key in self._read:
            if len(request.headers.getall(key, ())) > 1:
                # Two copies: one may be the client's, passed through by a careless proxy.
                return error_answer(400, "invalid_request", f"{key}: must appear once")
        return None

    def _may_debit(self, request: web.BaseRequest) -> Callable[[str], None]:
        """PermissionDenied for an account the calling proxy's certificate may not debit."""

        def check(account_id: str) -> None:
            proxy = self._identities.listed(_common_names(request))
            self._identities.check_account(proxy, account_id)

        return check


def _common_names(request: web.BaseRequest) -> list[str]:
    """The common names of the client certificate (mutual TLS), or none."""
    transport = request.transport
    peer = transport.get_extra_info("peercert") if transport is not None else None
    subject = peer.get("subject", ()) if peer else ()
    return [value for rdn in subject for key, value in rdn if key == "commonName"]


def _digest(secret: str) -> bytes:
    # Equal-length inputs for compare_digest, whatever was presented.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
