"""Bad input: INVALID_ARGUMENT with a message naming the field, and nothing debited."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund_over_grpc, rid

ACCOUNT = "victim"
Call = Callable[[RunningGate, str], Awaitable[Any]]


def _authorize(**fields: Any) -> Call:
    base: dict[str, Any] = {"account_id": ACCOUNT, "request_id": "r-1", "amount_micros": 1}

    def call(running: RunningGate, _: str) -> Awaitable[Any]:
        return running.gate.Authorize(gate_pb2.AuthorizeRequest(**{**base, **fields}))

    return call


def _settle(**fields: Any) -> Call:
    def call(running: RunningGate, request_id: str) -> Awaitable[Any]:
        base = {"account_id": ACCOUNT, "request_id": request_id, "amount_micros": 1}
        return running.gate.Settle(gate_pb2.SettleRequest(**{**base, **fields}))

    return call


def _credit(**fields: Any) -> Call:
    base: dict[str, Any] = {
        "account_id": ACCOUNT,
        "amount_micros": 1,
        "reason": "r",
        "idempotency_key": "k",
    }

    def call(running: RunningGate, _: str) -> Awaitable[Any]:
        return running.admin.Credit(admin_pb2.CreditRequest(**{**base, **fields}))

    return call


CASES: dict[str, tuple[Call, str]] = {
    "authorize empty account_id": (_authorize(account_id=""), "account_id"),
    "authorize missing request_id": (_authorize(request_id=""), "request_id"),
    "authorize account_id over 128 bytes": (_authorize(account_id="a" * 129), "account_id"),
    "authorize account_id 65 chars 130 bytes": (_authorize(account_id="é" * 65), "account_id"),
    "authorize control character": (_authorize(request_id="r\n1"), "request_id"),
    "authorize C1 control character": (_authorize(account_id="a\x85b"), "account_id"),
    "authorize negative amount": (_authorize(amount_micros=-1), "amount_micros"),
    "authorize absurd amount": (_authorize(amount_micros=2**62), "amount_micros"),
    "authorize long capability": (_authorize(capability="c" * 65), "capability"),
    "settle negative amount": (_settle(amount_micros=-5), "amount_micros"),
    "settle absurd amount": (_settle(amount_micros=2**63 - 1), "amount_micros"),
    "settle missing request_id": (_settle(request_id=""), "request_id"),
    "credit zero amount": (_credit(amount_micros=0), "amount_micros"),
    "credit absurd amount": (_credit(amount_micros=-(2**62)), "amount_micros"),
    "credit empty reason": (_credit(reason="  "), "reason"),
    "credit missing idempotency_key": (_credit(idempotency_key=""), "idempotency_key"),
    "create lower-case currency": (
        lambda r, _: r.admin.CreateAccount(
            admin_pb2.CreateAccountRequest(account_id="x", currency="usd")
        ),
        "currency",
    ),
    "create empty account_id": (
        lambda r, _: r.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="")),
        "account_id",
    ),
    "status unspecified": (
        lambda r, _: r.admin.SetAccountStatus(
            admin_pb2.SetAccountStatusRequest(
                account_id=ACCOUNT, status=admin_pb2.ACCOUNT_STATUS_UNSPECIFIED
            )
        ),
        "status",
    ),
    "get empty account_id": (
        lambda r, _: r.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="")),
        "account_id",
    ),
    # Found by test_fuzz_inputs: zoneinfo looked the name up as a file, and a name
    # too long for the file system was OSError, answered UNAVAILABLE.
    "time zone longer than a file name": (
        lambda r, _: r.admin.SetAccountTimeZone(
            admin_pb2.SetAccountTimeZoneRequest(account_id=ACCOUNT, time_zone="a" * 300)
        ),
        "time_zone",
    ),
    "time zone with a control character": (
        lambda r, _: r.admin.SetAccountTimeZone(
            admin_pb2.SetAccountTimeZoneRequest(account_id=ACCOUNT, time_zone="Europe/Paris\x00")
        ),
        "time_zone",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_is_invalid_argument_naming_the_field(
    running: RunningGate, case: str
) -> None:
    await fund_over_grpc(running.admin, ACCOUNT, USD)
    authorized = authorize_request(ACCOUNT, 100_000)
    await running.gate.Authorize(authorized)
    call, field = CASES[case]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(running, authorized.request_id)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")

    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id=ACCOUNT))
    assert (account.balance_micros, account.credited_micros) == (900_000, USD)
    assert (await running.app.pg.get_account("x")) is None


async def test_existing_account_is_already_exists_and_unknown_is_not_found(
    running: RunningGate,
) -> None:
    await running.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="twin"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="twin"))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="nobody"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_credit_replay_applies_once_and_a_reused_key_is_refused(
    running: RunningGate,
) -> None:
    await running.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="keyed"))
    key = rid()
    credit = admin_pb2.CreditRequest(
        account_id="keyed", amount_micros=USD, reason="wire", idempotency_key=key
    )
    first = await running.admin.Credit(credit)
    again = await running.admin.Credit(credit)
    assert (first.balance_micros, again.balance_micros) == (USD, USD)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.admin.Credit(
            admin_pb2.CreditRequest(
                account_id="keyed", amount_micros=2 * USD, reason="wire", idempotency_key=key
            )
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "idempotency_key" in (raised.value.details() or "")
