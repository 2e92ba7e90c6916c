"""One table from exceptions to answers, shared by every edge.

The gRPC servicers (gate and admin), Envoy's ext_authz and the plain HTTP
endpoint all turn a failure into a `Status` here and only here: invalid input
-> INVALID_ARGUMENT / 400, unknown -> NOT_FOUND / 404, a store or gateway out
of reach -> UNAVAILABLE / 503, anything unexpected -> INTERNAL / 500 (logged).
Nothing surfaces as gRPC UNKNOWN or as an unhandled exception.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from balance_gate import errors, metrics
from balance_gate.payments import GatewayUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Status:
    grpc_code: grpc.StatusCode
    http_status: int
    code: str  # the machine-readable code of an HTTP JSON error (x-balance-gate-code)
    message: str


_DOMAIN: dict[type[errors.GateError], tuple[grpc.StatusCode, int, str]] = {
    errors.InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request"),
    errors.NotFound: (grpc.StatusCode.NOT_FOUND, 404, "not_found"),
    errors.AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, 409, "already_exists"),
    errors.FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, 409, "request_conflict"),
    errors.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_denied"),
    errors.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401, "unauthenticated"),
    errors.Unavailable: (grpc.StatusCode.UNAVAILABLE, 503, "unavailable"),
}

# Postgres did not answer in time or at all: the call may be retried.
_POSTGRES_AWAY = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.QueryCanceledError,  # statement_timeout (DATABASE_TIMEOUT_MS)
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
)


def _unavailable(message: str) -> Status:
    return Status(grpc.StatusCode.UNAVAILABLE, 503, "unavailable", message)


def status_of(exc: BaseException, component: str) -> Status:
    """The answer for `exc` raised while serving `component` (an RPC or edge name)."""
    if isinstance(exc, errors.GateError):
        grpc_code, http_status, code = _DOMAIN[type(exc)]
        return Status(grpc_code, http_status, code, str(exc))
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        metrics.REDIS_ERRORS.labels(component).inc()
        return _unavailable("redis unavailable")
    if isinstance(exc, _POSTGRES_AWAY):
        metrics.POSTGRES_ERRORS.labels(component).inc()
        return _unavailable("postgres unavailable")
    if isinstance(exc, GatewayUnavailable):  # the outcome is unknown; retry with the same key
        return _unavailable("payment gateway unavailable")
    if isinstance(exc, OSError):  # includes TimeoutError: a store did not answer in time
        return _unavailable("a backing store is unavailable")
    if isinstance(exc, RedisError):
        metrics.REDIS_ERRORS.labels(component).inc()
    elif isinstance(exc, asyncpg.PostgresError):
        metrics.POSTGRES_ERRORS.labels(component).inc()
    log.error("%s failed", component, exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, 500, "internal", "internal error")
