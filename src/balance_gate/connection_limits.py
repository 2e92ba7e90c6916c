"""How many connections a listener holds, and how long a slow or idle one may stay.

Every open socket is a file descriptor, and Redis and Postgres connections need
descriptors too: sockets that never send a request (no HTTP/2 preface, half-sent
HTTP headers) must not be able to take them all (issue 12 item 9).

- gRPC listeners (gate, admin): grpc core's own limits (`grpc_options`): the
  handshake deadline, which also covers the client's HTTP/2 preface and
  SETTINGS; the idle limit (GOAWAY to a connection without calls); keepalive
  pings that find dead peers under a long AuthorizeStream; an optional maximum
  age; and `grpc.max_allowed_incoming_connections`.
- The HTTP endpoint: aiohttp closes a connection that waits longer than its
  keep-alive timeout for the next request's headers, counted from the
  connection's start or the last answer, and nothing sooner; `GuardedHttpServer`
  adds the deadline for the first request's headers and the connection cap.
- `reserve_descriptors` raises the process's soft descriptor limit so that
  every listener at its cap still leaves descriptors for the stores.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from balance_gate import metrics
from balance_gate.settings import Settings

log = logging.getLogger(__name__)

# Descriptors kept beyond the listeners' caps: the Redis and Postgres pools, log
# files, the metrics server, listening sockets.
SPARE_DESCRIPTORS = 1_024
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TOO_SLOW = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int  # per listener
    handshake_timeout_ms: int
    idle_timeout_ms: int
    keepalive_time_ms: int
    keepalive_timeout_ms: int
    max_age_ms: int  # 0: none
    max_age_grace_ms: int
    http_header_timeout_ms: int
    http_idle_timeout_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_connections=settings.max_connections,
            handshake_timeout_ms=settings.handshake_timeout_ms,
            idle_timeout_ms=settings.connection_idle_timeout_ms,
            keepalive_time_ms=settings.keepalive_time_ms,
            keepalive_timeout_ms=settings.keepalive_timeout_ms,
            max_age_ms=settings.connection_max_age_ms,
            max_age_grace_ms=settings.connection_max_age_grace_ms,
            http_header_timeout_ms=settings.http_authz_header_timeout_ms,
            http_idle_timeout_ms=settings.http_authz_idle_timeout_ms,
        )


def grpc_options(limits: ConnectionLimits) -> list[tuple[str, int]]:
    """grpc server options (channel args) bounding a listener's connections."""
    options = [
        # TLS, then the client's HTTP/2 preface and SETTINGS, must arrive in time.
        ("grpc.server_handshake_timeout_ms", limits.handshake_timeout_ms),
        # Connections beyond it are closed as they are accepted.
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        # No call for this long: GOAWAY (the client reconnects on its next call).
        ("grpc.max_connection_idle_ms", limits.idle_timeout_ms),
        # Ping a quiet connection (an AuthorizeStream too): a dead peer is closed.
        ("grpc.keepalive_time_ms", limits.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", limits.keepalive_timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if limits.max_age_ms:  # grpc has no "off" value but its default (INT_MAX)
        options += [
            ("grpc.max_connection_age_ms", limits.max_age_ms),
            ("grpc.max_connection_age_grace_ms", limits.max_age_grace_ms),
        ]
    return options


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class GuardedHttpServer(web.Server):
    """aiohttp's low-level server with a connection cap and a first-request deadline.

    A connection beyond `max_connections` is answered 503 and closed at once;
    one whose first request's headers are not complete within
    `http_header_timeout_ms` is answered 408 and closed. Later requests on a
    kept-alive connection are bounded by aiohttp's keep-alive timeout
    (`http_idle_timeout_ms`), which closes a connection still waiting for a
    whole request that long after the last answer.
    """

    def __init__(self, handler: Handler, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(
            self._serve, keepalive_timeout=limits.http_idle_timeout_ms / 1000, **kwargs
        )
        self._handler = handler
        self._limits = limits
        self._open: set[web.RequestHandler] = set()
        self._deadlines: dict[web.RequestHandler, asyncio.TimerHandle] = {}

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._open) >= self._limits.max_connections:
            metrics.HTTP_AUTHZ_CONNECTIONS_CLOSED.labels("over_limit").inc()
            transport.write(_BUSY)
            transport.close()
            return
        self._open.add(handler)
        metrics.HTTP_AUTHZ_CONNECTIONS.set(len(self._open))
        self._deadlines[handler] = asyncio.get_running_loop().call_later(
            self._limits.http_header_timeout_ms / 1000, self._too_slow, handler, transport
        )

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        self._open.discard(handler)
        metrics.HTTP_AUTHZ_CONNECTIONS.set(len(self._open))
        self._headers_read(handler)
        super().connection_lost(handler, exc)

    def _too_slow(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self._deadlines.pop(handler, None)
        metrics.HTTP_AUTHZ_CONNECTIONS_CLOSED.labels("header_timeout").inc()
        transport.write(_TOO_SLOW)
        transport.close()

    def _headers_read(self, handler: web.RequestHandler) -> None:
        deadline = self._deadlines.pop(handler, None)
        if deadline is not None:
            deadline.cancel()

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        # aiohttp calls the handler once a request's headers are complete.
        self._headers_read(request.protocol)
        return await self._handler(request)


def reserve_descriptors(limits: ConnectionLimits, listeners: int) -> None:
    """Raise the soft descriptor limit so that `listeners` at their cap leave
    SPARE_DESCRIPTORS for everything else; warn when the hard limit forbids it."""
    needed = listeners * limits.max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning(
            "%d listeners at BALANCE_GATE_MAX_CONNECTIONS=%d need %d file descriptors;"
            " the limit is %d: lower MAX_CONNECTIONS or raise the limit (LimitNOFILE, ulimit -n)",
            listeners,
            limits.max_connections,
            needed,
            target,
        )
