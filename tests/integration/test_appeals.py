"""P14: abuse appeals within 7 days refund the unconsumed credit of auto top-ups."""

from __future__ import annotations

import grpc
import pytest

from balance_gate.app import App
from balance_gate.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from balance_gate.v1 import admin_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, fund, ledger_balance, rid


async def _auto_topped_up(app: App, account_id: str) -> int:
    """$10 funded, auto top-up of $20 under $5: spending $6 triggers one; its id."""
    await app.hot.ensure_top_up_groups()
    await fund(app, account_id, 10 * USD)
    await app.topups.set_payment_methods(account_id, "pm_card_visa", "")
    await app.topups.set_auto_top_up(account_id, True, 5 * USD, 20 * USD, 100 * USD, 0)
    assert (await app.gate.authorize(account_id, rid(), 6 * USD, "")).allowed
    while await app.top_up_worker.handle_new(None):
        pass
    [top_up] = await app.topups.list_top_ups(account_id)
    assert (top_up.kind, top_up.status) == ("auto", "succeeded")
    return top_up.top_up_id


async def test_p14_confirmed_appeal_refunds_unconsumed_auto_top_ups_and_pauses(
    app: App,
) -> None:
    top_up_id = await _auto_topped_up(app, "p14")  # balance $24: $4 + the $20 top-up
    assert (await app.gate.authorize("p14", rid(), 7 * USD, "")).allowed  # runaway crawler
    appeal = await app.appeals.file("p14", "our API key leaked on GitHub")
    assert (appeal.status, appeal.top_up_ids) == ("open", (top_up_id,))
    resolved = await app.appeals.resolve(appeal.appeal_id, confirmed=True)
    assert resolved.status == "confirmed"
    assert resolved.decided_at is not None
    # The $7 burnt the older $4 lot first, then $3 of the top-up: $17 is unconsumed.
    assert resolved.refunded_micros == 17 * USD
    hot = await app.hot.read_account("p14")
    assert hot is not None
    assert hot.balance_micros == 0
    await app.flusher.drain()
    assert await ledger_balance(app, "p14") == 0
    assert await app.pg.lot_balance("p14") == 0
    settings = await app.topups.auto_top_up("p14")
    assert settings is not None
    assert settings.paused
    # Paused: falling under the threshold charges nothing more.
    await app.accounts.credit("p14", 1 * USD, "goodwill", rid())
    assert (await app.gate.authorize("p14", rid(), 1, "")).allowed
    assert await app.top_up_worker.handle_new(None) == 0
    # Resolving again refunds nothing twice.
    again = await app.appeals.resolve(appeal.appeal_id, confirmed=True)
    assert again.refunded_micros == 17 * USD
    refunds = await app.pool.fetchval("SELECT count(*) FROM sandbox_refunds")
    assert refunds == 1


async def test_p14_appeal_outside_7_days_is_refused(app: App) -> None:
    top_up_id = await _auto_topped_up(app, "p14-late")
    await app.pool.execute(
        "UPDATE top_ups SET created_at = now() - interval '8 days' WHERE top_up_id = $1",
        top_up_id,
    )
    with pytest.raises(FailedPrecondition, match="7 days"):
        await app.appeals.file("p14-late", "we only noticed now")


async def test_p14_rejected_appeal_refunds_nothing_and_is_kept(app: App) -> None:
    await _auto_topped_up(app, "p14-no")
    appeal = await app.appeals.file("p14-no", "not us")
    with pytest.raises(AlreadyExists):
        await app.appeals.file("p14-no", "not us, again")
    rejected = await app.appeals.resolve(appeal.appeal_id, confirmed=False)
    assert (rejected.status, rejected.refunded_micros) == ("rejected", 0)
    with pytest.raises(FailedPrecondition):
        await app.appeals.resolve(appeal.appeal_id, confirmed=True)
    with pytest.raises(InvalidArgument, match="description"):
        await app.appeals.file("p14-no", "   ")


async def test_p14_appeal_over_grpc(running: RunningGate) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as none_yet:
        await running.admin.FileAbuseAppeal(
            admin_pb2.FileAbuseAppealRequest(account_id="nobody", description="x")
        )
    assert none_yet.value.code() == grpc.StatusCode.NOT_FOUND
