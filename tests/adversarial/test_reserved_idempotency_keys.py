"""Issue 13 item 4: an operator's idempotency key must never take one the system makes.

Credits, refunds and top-ups are unique per (account, idempotency key), and the
system keys its own rows the same way: a top-up's credit `balance-gate-top-up-<id>`,
a refund's `balance-gate-refund-<id>`, an appeal's refund
`balance-gate-appeal-<a>-top-up-<t>`. An operator who got there first wedged them:
the refund took money out of Redis and then failed (hot 0 vs ledger 9,999,999), the
top-up was charged at the gateway and never credited. The prefix `balance-gate-` is
now reserved: a client key with it is INVALID_ARGUMENT naming idempotency_key, so
both flows complete and the audit stays clean.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from balance_gate.app import App
from balance_gate.audit import audit_all, format_report
from balance_gate.v1 import admin_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, rid, wait_until_flushed


async def _card_account(running: RunningGate, account_id: str) -> None:
    await running.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id=account_id))
    await running.admin.SetPaymentMethods(
        admin_pb2.SetPaymentMethodsRequest(account_id=account_id, primary="pm_card_visa")
    )


async def _operator_credit(running: RunningGate, account_id: str, micros: int, key: str) -> str:
    """The operator's Credit with `key`: 'ok', or the gRPC status and message."""
    try:
        await running.admin.Credit(
            admin_pb2.CreditRequest(
                account_id=account_id, amount_micros=micros, reason="goodwill", idempotency_key=key
            )
        )
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "ok"


async def _money(app: App, account_id: str) -> dict[str, Any]:
    """Hot balance, ledger balance and what `balance-gate audit` says."""
    await wait_until_flushed(app)
    hot = await app.hot.read_account(account_id)
    row = await app.pg.get_account(account_id)
    assert hot is not None
    assert row is not None
    report = await audit_all(app.pg, app.hot, app.flusher)
    return {
        "hot": hot.balance_micros,
        "ledger": row.ledger_balance_micros,
        "audit": [line for line in format_report(report) if line.startswith(account_id)],
    }


async def _gateway_charges(app: App, top_up_id: int) -> int:
    count: int = await app.pool.fetchval(
        "SELECT count(*) FROM sandbox_charges WHERE idempotency_key = $1",
        f"balance-gate-top-up-{top_up_id}",
    )
    return count


async def test_issue13_item4_an_operator_refund_key_cannot_wedge_a_refund(
    running: RunningGate,
) -> None:
    """P13: Credit(-1, key=balance-gate-refund-1) before RefundTopUp(1) took $10 from
    Redis and left the refund in `taking` (hot 0 vs ledger 9,999,999)."""
    await _card_account(running, "wedge-refund")
    top_up = await running.admin.TopUp(
        admin_pb2.TopUpRequest(
            account_id="wedge-refund", amount_micros=10 * USD, idempotency_key=rid()
        )
    )
    assert top_up.status == admin_pb2.TOP_UP_STATUS_SUCCEEDED
    next_refund_id = 1 + await running.app.pool.fetchval(
        "SELECT coalesce(max(refund_id), 0) FROM refunds"
    )
    credit = await _operator_credit(
        running, "wedge-refund", -1, f"balance-gate-refund-{next_refund_id}"
    )
    try:
        refund = await running.admin.RefundTopUp(
            admin_pb2.RefundTopUpRequest(
                top_up_id=top_up.top_up_id, reason="customer left", idempotency_key=rid()
            )
        )
        refunded: object = (refund.status, refund.refunded_micros)
    except grpc.aio.AioRpcError as exc:
        refunded = f"{exc.code().name}: {exc.details()}"
    statuses = await running.app.pool.fetch("SELECT status FROM refunds")
    outcome = {
        **await _money(running.app, "wedge-refund"),
        "refund": refunded,
        "refund rows": [r["status"] for r in statuses],
    }
    assert outcome == {
        "hot": 0,
        "ledger": 0,
        "audit": [],
        "refund": ("succeeded", 10 * USD),
        "refund rows": ["succeeded"],
    }
    assert credit.startswith("INVALID_ARGUMENT: idempotency_key:"), credit


async def test_issue13_item4_an_operator_top_up_key_cannot_strand_a_charge(
    running: RunningGate,
) -> None:
    """P4: Credit(key=balance-gate-top-up-2) before top-up 2 left it charged at the
    gateway and never credited (pending forever, FAILED_PRECONDITION on every retry)."""
    await _card_account(running, "wedge-top-up")
    next_top_up_id = 1 + await running.app.pool.fetchval(
        "SELECT coalesce(max(top_up_id), 0) FROM top_ups"
    )
    credit = await _operator_credit(
        running, "wedge-top-up", USD, f"balance-gate-top-up-{next_top_up_id}"
    )
    try:
        answer = await running.admin.TopUp(
            admin_pb2.TopUpRequest(
                account_id="wedge-top-up", amount_micros=10 * USD, idempotency_key=rid()
            )
        )
        top_up: object = (admin_pb2.TopUpStatus.Name(answer.status), answer.credited_micros)
    except grpc.aio.AioRpcError as exc:
        top_up = f"{exc.code().name}: {exc.details()}"
    row = await running.app.pool.fetchrow(
        "SELECT top_up_id, status FROM top_ups WHERE account_id = 'wedge-top-up'"
    )
    assert row is not None
    assert row["top_up_id"] == next_top_up_id
    outcome = {
        **await _money(running.app, "wedge-top-up"),
        "top-up": top_up,
        "row": row["status"],
        "gateway charges": await _gateway_charges(running.app, next_top_up_id),
    }
    assert outcome == {
        "hot": 10 * USD,
        "ledger": 10 * USD,
        "audit": [],
        "top-up": ("TOP_UP_STATUS_SUCCEEDED", 10 * USD),
        "row": "succeeded",
        "gateway charges": 1,
    }
    assert credit.startswith("INVALID_ARGUMENT: idempotency_key:"), credit


@pytest.mark.parametrize(
    "key",
    ["balance-gate-refund-7", "BALANCE-GATE-top-up-7", "Balance-Gate-appeal-1-top-up-2"],
)
async def test_issue13_item4_every_client_key_with_the_reserved_prefix_is_refused(
    running: RunningGate, key: str
) -> None:
    """Credit, TopUp and RefundTopUp all refuse the prefix (any case), naming the field."""
    await _card_account(running, "reserved")
    top_up = await running.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="reserved", amount_micros=USD, idempotency_key=rid())
    )
    calls: list[Awaitable[object]] = [
        running.admin.Credit(
            admin_pb2.CreditRequest(
                account_id="reserved", amount_micros=USD, reason="x", idempotency_key=key
            )
        ),
        running.admin.TopUp(
            admin_pb2.TopUpRequest(account_id="reserved", amount_micros=USD, idempotency_key=key)
        ),
        running.admin.RefundTopUp(
            admin_pb2.RefundTopUpRequest(
                top_up_id=top_up.top_up_id, reason="x", idempotency_key=key
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (raised.value.details() or "").startswith("idempotency_key:")
    counts = await running.app.pool.fetchrow(
        """SELECT (SELECT count(*) FROM credits WHERE account_id = 'reserved') AS credits,
                  (SELECT count(*) FROM top_ups WHERE account_id = 'reserved') AS top_ups,
                  (SELECT count(*) FROM refunds WHERE account_id = 'reserved') AS refunds"""
    )
    assert counts is not None
    assert dict(counts) == {"credits": 1, "top_ups": 1, "refunds": 0}
