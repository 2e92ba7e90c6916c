"""The sidecar process: two gRPC listeners, the metrics endpoint, background tasks.

Start-up: open the stores, bind the proxies' port (BalanceGate) and the
operators' port (Admin), each with grpc.health.v1 and server reflection, TLS
when configured, explicit message and stream limits, and the admin token check
on the admin port (docs/security.md); serve /metrics, start the usage flusher
and the credit sweeper.
Shutdown (SIGTERM/SIGINT): health goes NOT_SERVING, the listeners stop taking
calls and let in-flight ones finish, the flusher drains, the pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from balance_gate import decoding, ext_authz, metrics
from balance_gate.app import App
from balance_gate.auth import (
    AdminTokenInterceptor,
    ProxyIdentities,
    http_ssl_context,
    tls_credentials,
)
from balance_gate.connection_limits import ConnectionLimits, grpc_options, reserve_descriptors
from balance_gate.grpc_api import AdminServicer, BalanceGateServicer
from balance_gate.http_authz import AuthzKeys, HttpAuthz
from balance_gate.settings import Settings, split_host_port
from balance_gate.v1 import admin_pb2, gate_pb2

log = logging.getLogger(__name__)

# grpc-stubs types only the synchronous half of grpc_health.
AsyncHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

GATE_SERVICE = gate_pb2.DESCRIPTOR.services_by_name["BalanceGate"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of a listener; grpc's defaults are not ours to inherit."""

    max_receive_bytes: int
    max_send_bytes: int
    max_concurrent_streams: int  # per connection
    connections: ConnectionLimits  # how many, and how long slow or idle ones stay

    @classmethod
    def gate(cls, settings: Settings) -> ServerLimits:
        return cls(
            settings.max_message_bytes,
            settings.max_message_bytes,
            settings.max_concurrent_streams,
            ConnectionLimits.from_settings(settings),
        )

    @classmethod
    def admin(cls, settings: Settings) -> ServerLimits:
        return cls(
            settings.max_message_bytes,
            settings.admin_max_send_bytes,
            settings.max_concurrent_streams,
            ConnectionLimits.from_settings(settings),
        )


def server_options(limits: ServerLimits, *, reuse_port: bool) -> list[tuple[str, int]]:
    return [
        # Several worker processes may share one port (--workers); a lone
        # process must not silently share its port with a stale one.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Proxies keep one channel open for hours; let them ping it.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # A bigger message is RESOURCE_EXHAUSTED before it is parsed.
        ("grpc.max_receive_message_length", limits.max_receive_bytes),
        ("grpc.max_send_message_length", limits.max_send_bytes),
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: more calls on one connection wait.
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        *grpc_options(limits.connections),
    ]


def grpc_server(
    *,
    reuse_port: bool,
    limits: ServerLimits,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
) -> grpc.aio.Server:
    """A grpc.aio server with the options every listener of ours uses.

    The no-op benchmark server builds its server here too, so that both are
    measured with the same settings.
    """
    return grpc.aio.server(
        options=server_options(limits, reuse_port=reuse_port), interceptors=interceptors
    )


@dataclass(frozen=True)
class Listening:
    gate_port: int
    admin_port: int
    metrics_port: int
    http_authz_port: int | None = None  # the HTTP endpoint, when HTTP_AUTHZ_LISTEN is set


def _listener(
    services: Sequence[str],
    add: Callable[[grpc.aio.Server], None],
    *,
    reuse_port: bool,
    limits: ServerLimits,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
) -> tuple[grpc.aio.Server, Any]:
    server = grpc_server(reuse_port=reuse_port, limits=limits, interceptors=interceptors)
    add(server)
    checker = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        [
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server, checker


class Sidecar:
    def __init__(self, app: App) -> None:
        self.app = app
        settings = app.settings
        reuse_port = settings.workers > 1
        identities = ProxyIdentities(settings.proxy_identities)
        authz_keys = AuthzKeys.from_settings(settings)

        def add_gate_services(server: grpc.aio.Server) -> None:
            decoding.add_servicer(  # a request that does not parse is INVALID_ARGUMENT
                BalanceGateServicer(app.gate, settings.stream_max_in_flight, identities),
                server,
                gate_pb2.DESCRIPTOR.services_by_name["BalanceGate"],
            )
            ext_authz.add_to_server(server, app.gate, authz_keys, identities)

        self._gate, self._gate_health = _listener(
            [GATE_SERVICE, ext_authz.SERVICE_NAME],
            add_gate_services,
            reuse_port=reuse_port,
            limits=ServerLimits.gate(settings),
        )
        self._connection_limits = ConnectionLimits.from_settings(settings)
        self._http_authz = (
            HttpAuthz(
                app.gate,
                authz_keys,
                proxy_secret=settings.http_authz_secret.get_secret_value(),
                ssl_context=http_ssl_context(
                    settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
                ),
                identities=identities,
                connection_limits=self._connection_limits,
            )
            if settings.http_authz_listen
            else None
        )
        tokens = [token.get_secret_value() for token in settings.admin_token_values]
        self._admin, self._admin_health = _listener(
            [ADMIN_SERVICE],
            lambda s: decoding.add_servicer(
                AdminServicer(
                    app.accounts,
                    app.topups,
                    app.refunds,
                    app.appeals,
                    app.credit_lines,
                    app.credit_reviews,
                ),
                s,
                admin_pb2.DESCRIPTOR.services_by_name["Admin"],
            ),
            reuse_port=reuse_port,
            limits=ServerLimits.admin(settings),
            interceptors=[AdminTokenInterceptor(tokens)] if tokens else [],
        )
        self._admin_open = not tokens
        credentials = tls_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
        if credentials is None:
            self._gate_port = self._gate.add_insecure_port(settings.gate_listen)
            self._admin_port = self._admin.add_insecure_port(settings.admin_listen)
        else:
            self._gate_port = self._gate.add_secure_port(settings.gate_listen, credentials)
            self._admin_port = self._admin.add_secure_port(settings.admin_listen, credentials)
        self._metrics: WSGIServer | None = None
        self._stop_background = asyncio.Event()
        self._stop_leases = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._periodic: list[asyncio.Task[None]] = []

    async def start(self) -> Listening:
        settings = self.app.settings
        policy = await self.app.hot.eviction_policy()
        if policy not in (None, "noeviction"):
            # An evicted account would be reloaded from the ledger without the
            # usage still waiting in its stream: refuse writes, never forget.
            log.warning("Redis maxmemory-policy is %r; balance-gate needs 'noeviction'", policy)
        if settings.allow_insecure_listen:
            log.warning(
                "BALANCE_GATE_ALLOW_INSECURE_LISTEN is on: listeners start without the"
                " protection a non-loopback address needs (%s); never in production",
                "; ".join(f"{name}: {needs}" for name, needs in settings.unprotected_listeners())
                or "none lacks it now",
            )
        if self._admin_open:
            # Settings allow this only on a loopback address (docs/security.md).
            log.warning(
                "the admin API on %s takes calls without a token: set"
                " BALANCE_GATE_ADMIN_TOKENS or BALANCE_GATE_ADMIN_TOKEN_FILE",
                self.app.settings.admin_listen,
            )
        metrics.USAGE_BACKLOG_SHARD_LIMIT.set(self.app.settings.usage_backlog_max)
        listeners = 2 if self._http_authz is None else 3
        reserve_descriptors(self._connection_limits, listeners)
        # (task name, interval, job, what a failure is logged as): cancelled on stop.
        periodic: list[tuple[str, int, Callable[[], Awaitable[object]], str]] = [
            (
                "credit-sweeper",
                settings.credit_sweep_interval_ms,
                self.app.accounts.sweep_unapplied_credits,
                "credit sweep",
            ),
            (
                "lot-expiry",
                settings.lot_expiry_interval_ms,
                self.app.expiry.expire_due,
                "lot expiry",
            ),
            (
                "credit-reviews",
                settings.credit_review_interval_ms,
                self.app.credit_reviews.run,
                "credit line reviews",
            ),
        ]
        self._periodic = [
            asyncio.create_task(_every(interval_ms, job, what), name=name)
            for name, interval_ms, job, what in periodic
        ]
        self._tasks = [
            asyncio.create_task(self.app.flusher.run(self._stop_background), name="usage-flusher"),
            *self._periodic,
            asyncio.create_task(
                self.app.top_up_worker.run(self._stop_background), name="top-up-worker"
            ),
            asyncio.create_task(self.app.emails.run(self._stop_background), name="email-sender"),
        ]
        if self.app.leases is not None:
            self._tasks.append(
                asyncio.create_task(self.app.leases.run(self._stop_leases), name="lease-reporter")
            )
        await self._gate.start()
        await self._admin.start()
        for checker, service in (
            (self._gate_health, GATE_SERVICE),
            (self._admin_health, ADMIN_SERVICE),
        ):
            await checker.set("", health_pb2.HealthCheckResponse.SERVING)
            await checker.set(service, health_pb2.HealthCheckResponse.SERVING)
        http_port = None
        if self._http_authz is not None:
            host, port = split_host_port(self.app.settings.http_authz_listen)
            http_port = await self._http_authz.start(
                host, port, reuse_port=self.app.settings.workers > 1
            )
        # Last: a worker whose /metrics answers is serving every port (tests wait on it).
        host, port = self.app.settings.metrics_address
        self._metrics, _ = start_http_server(port, addr=host)
        return Listening(self._gate_port, self._admin_port, self._metrics.server_port, http_port)

    async def stop(self) -> None:
        grace_s = self.app.settings.shutdown_grace_ms / 1000
        await self._gate_health.enter_graceful_shutdown()
        await self._admin_health.enter_graceful_shutdown()
        if self._http_authz is not None:
            await self._http_authz.stop()
        await asyncio.gather(self._gate.stop(grace_s), self._admin.stop(grace_s))
        # Requests decided without Redis are settled in it before the flusher drains.
        await self.app.gate.settle_outage()
        # Leases go back (and their usage into the streams) before the flusher drains:
        # the lease reporter returns them all when told to stop.
        self._stop_leases.set()
        for task in self._tasks:
            if task.get_name() == "lease-reporter":
                await task
        self._stop_background.set()
        for task in self._periodic:  # they have nothing to finish
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
        await self.app.close()


async def _every(interval_ms: int, job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `job` every interval until cancelled; a failure is logged, never fatal."""
    while True:
        try:
            await job()
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(interval_ms / 1000)


async def serve(
    settings: Settings, on_ready: Callable[[Sidecar, Listening], Awaitable[None]] | None = None
) -> None:
    """Run the sidecar until SIGTERM or SIGINT; `on_ready` runs once it serves."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sidecar = Sidecar(await App.open(settings))
    listening = await sidecar.start()
    log.info(
        "serving: gate on %s, admin on %s, metrics on %s",
        listening.gate_port,
        listening.admin_port,
        listening.metrics_port,
    )
    if on_ready is not None:
        await on_ready(sidecar, listening)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await sidecar.stop()
