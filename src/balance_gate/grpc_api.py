"""The gRPC servicers: thin translations between protobuf and the core.

Errors become gRPC status codes here and only here: invalid input ->
INVALID_ARGUMENT, unknown -> NOT_FOUND, a store out of reach -> UNAVAILABLE,
anything unexpected -> INTERNAL (logged). Nothing surfaces as UNKNOWN.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from balance_gate import errors, metrics
from balance_gate.accounts import Accounts, AccountView
from balance_gate.gate import Gate
from balance_gate.v1 import admin_pb2, admin_pb2_grpc, gate_pb2, gate_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]

_STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _status_of(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.GateError):
        return _STATUS[type(exc)], str(exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        metrics.REDIS_ERRORS.labels(method).inc()
        return grpc.StatusCode.UNAVAILABLE, "redis unavailable"
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
        metrics.POSTGRES_ERRORS.labels(method).inc()
        return grpc.StatusCode.UNAVAILABLE, "postgres unavailable"
    if isinstance(exc, OSError):  # includes TimeoutError: a store did not answer in time
        return grpc.StatusCode.UNAVAILABLE, "a backing store is unavailable"
    if isinstance(exc, RedisError):
        metrics.REDIS_ERRORS.labels(method).inc()
    log.exception("%s failed", method)
    return grpc.StatusCode.INTERNAL, "internal error"


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map exceptions of one RPC method to a status (see module docstring)."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            code, message = _status_of(exc, name)
        metrics.RPC_ERRORS.labels(name, code.name).inc()
        await context.abort(code, message)
        raise AssertionError("abort() returned")  # pragma: no cover

    return wrapper


class BalanceGateServicer(gate_pb2_grpc.BalanceGateServicer):
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    @rpc
    async def Authorize(
        self, request: gate_pb2.AuthorizeRequest, context: Context
    ) -> gate_pb2.AuthorizeResponse:
        decision = await self._gate.authorize(
            request.account_id, request.request_id, request.amount_micros, request.capability
        )
        return gate_pb2.AuthorizeResponse(
            allowed=decision.allowed,
            code=decision.code,
            balance_micros=decision.balance_micros,
            replayed=decision.replayed,
        )

    @rpc
    async def Settle(
        self, request: gate_pb2.SettleRequest, context: Context
    ) -> gate_pb2.SettleResponse:
        settlement = await self._gate.settle(
            request.account_id, request.request_id, request.amount_micros
        )
        return gate_pb2.SettleResponse(
            balance_micros=settlement.balance_micros,
            delta_micros=settlement.delta_micros,
            replayed=settlement.replayed,
        )


_STATUS_NAMES = {
    admin_pb2.ACCOUNT_STATUS_ACTIVE: "active",
    admin_pb2.ACCOUNT_STATUS_DISABLED: "disabled",
}
_STATUS_ENUMS = {name: value for value, name in _STATUS_NAMES.items()}


def _account(view: AccountView) -> admin_pb2.Account:
    created_at = Timestamp()
    created_at.FromDatetime(view.created_at)
    return admin_pb2.Account(
        account_id=view.account_id,
        currency=view.currency,
        balance_micros=view.balance_micros,
        status=_STATUS_ENUMS[view.status],
        created_at=created_at,
        credited_micros=view.credited_micros,
        used_micros=view.used_micros,
        unflushed_usage_micros=view.unflushed_usage_micros,
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    @rpc
    async def CreateAccount(
        self, request: admin_pb2.CreateAccountRequest, context: Context
    ) -> admin_pb2.Account:
        return _account(await self._accounts.create(request.account_id, request.currency))

    @rpc
    async def GetAccount(
        self, request: admin_pb2.GetAccountRequest, context: Context
    ) -> admin_pb2.Account:
        return _account(await self._accounts.get(request.account_id))

    @rpc
    async def Credit(self, request: admin_pb2.CreditRequest, context: Context) -> admin_pb2.Account:
        view = await self._accounts.credit(
            request.account_id, request.amount_micros, request.reason, request.idempotency_key
        )
        return _account(view)

    @rpc
    async def SetAccountStatus(
        self, request: admin_pb2.SetAccountStatusRequest, context: Context
    ) -> admin_pb2.Account:
        status = _STATUS_NAMES.get(request.status)
        if status is None:
            raise errors.InvalidArgument(
                "status", "must be ACCOUNT_STATUS_ACTIVE or ACCOUNT_STATUS_DISABLED"
            )
        return _account(await self._accounts.set_status(request.account_id, status))
