"""Credit lines C1 and C2: a limit lets the balance go below zero, down to -limit."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from balance_gate.app import App
from balance_gate.credit_lines import CreditLine
from balance_gate.errors import InvalidArgument, NotFound
from balance_gate.v1 import admin_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund, rid

CENT = 10_000


def _line(account_id: str, limit: int, **profile: object) -> CreditLine:
    return CreditLine(
        account_id=account_id,
        limit_micros=limit,
        deposit_micros=0,
        review_every_days=30,
        next_review_on=dt.date.today(),
        high_cost_capabilities=(),
        **profile,  # type: ignore[arg-type]
    )


async def test_c1_a_limit_lets_the_balance_go_down_to_minus_the_limit(app: App) -> None:
    await fund(app, "c1", 1 * USD)
    await app.credit_lines.set(_line("c1", 2 * USD))
    first = await app.gate.authorize("c1", rid(), 250 * CENT, "")
    assert (first.allowed, first.balance_micros) == (True, -150 * CENT)
    second = await app.gate.authorize("c1", rid(), 50 * CENT, "")
    assert (second.allowed, second.balance_micros) == (True, -2 * USD)
    beyond = await app.gate.authorize("c1", rid(), 1, "")
    assert (beyond.allowed, beyond.code) == (False, "insufficient_balance")


async def test_c1_the_limit_survives_redis_losing_the_account(app: App) -> None:
    await fund(app, "c1-reload", 1 * USD)
    await app.credit_lines.set(_line("c1-reload", 1 * USD))
    assert (await app.gate.authorize("c1-reload", rid(), 150 * CENT, "")).allowed
    await app.flusher.drain()
    await app.redis.delete(app.hot.keys.account("c1-reload"))  # loaded again from Postgres
    assert (await app.gate.authorize("c1-reload", rid(), 50 * CENT, "")).allowed
    assert not (await app.gate.authorize("c1-reload", rid(), 1, "")).allowed


async def test_c1_without_a_line_the_floor_is_zero_and_a_line_can_be_cut(app: App) -> None:
    await fund(app, "c1-cut", 1 * USD)
    assert not (await app.gate.authorize("c1-cut", rid(), 101 * CENT, "")).allowed
    await app.credit_lines.set(_line("c1-cut", 5 * USD))
    assert (await app.gate.authorize("c1-cut", rid(), 101 * CENT, "")).allowed
    await app.credit_lines.set(_line("c1-cut", 0))  # the operator cuts the line
    assert not (await app.gate.authorize("c1-cut", rid(), 1, "")).allowed


async def test_c2_the_profile_is_kept_for_the_reviewer(app: App) -> None:
    await fund(app, "c2", 1 * USD)
    line = _line(
        "c2",
        3 * USD,
        entity="Example GmbH",
        payment_terms_days=45,
        expected_monthly_micros=900 * USD,
        expected_peak_micros=80 * USD,
        expected_high_cost_share_pct=30,
    )
    stored = await app.credit_lines.set(line)
    assert stored.entity == "Example GmbH"
    assert (stored.payment_terms_days, stored.expected_high_cost_share_pct) == (45, 30)
    assert stored.next_review_on == dt.date.today() + dt.timedelta(days=30)
    assert await app.credit_lines.get("c2") == stored
    with pytest.raises(InvalidArgument, match="limit_micros"):
        await app.credit_lines.set(_line("c2", -1))
    with pytest.raises(NotFound):
        await app.credit_lines.set(_line("nobody", 1))


async def test_credit_line_over_grpc(running: RunningGate) -> None:
    await running.admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="c-rpc"))
    line = await running.admin.SetCreditLine(
        admin_pb2.CreditLine(
            account_id="c-rpc",
            limit_micros=2 * USD,
            review_every_days=90,
            high_cost_capabilities=["gpt-4o"],
            stop_loss=admin_pb2.StopLoss(share_pct=80),
        )
    )
    assert (line.limit_micros, line.stop_loss.share_pct, list(line.high_cost_capabilities)) == (
        2 * USD,
        80,
        ["gpt-4o"],
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await running.admin.SetCreditLine(
            admin_pb2.CreditLine(account_id="c-rpc", limit_micros=1, review_every_days=0)
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "review_every_days" in (bad.value.details() or "")


def _stop_loss_line(account_id: str, *, share: int = 50, rate: int = 0) -> CreditLine:
    return CreditLine(
        account_id=account_id,
        limit_micros=2 * USD,
        deposit_micros=0,
        review_every_days=30,
        next_review_on=dt.date.today(),
        high_cost_capabilities=("gpt-4o", "o1"),
        stop_loss_share_pct=share,
        stop_loss_rate_per_s=rate,
    )


async def test_c4_past_the_stop_loss_point_high_cost_capabilities_are_blocked(app: App) -> None:
    """C4: with half of a $2 line used, gpt-4o stops; plain requests go on to the limit.

    A request that would end at or past the stop point is past it (issue 13 item 8),
    and past it a request naming no capability is blocked like a high-cost one."""
    await fund(app, "c4", 1 * USD)
    await app.credit_lines.set(_stop_loss_line("c4", share=50))
    assert (await app.gate.authorize("c4", rid(), 150 * CENT, "gpt-4o")).allowed  # -0.50
    landing = await app.gate.authorize("c4", rid(), 50 * CENT, "gpt-4o")  # would be -1.00
    assert (landing.allowed, landing.code) == (False, "capability_blocked")
    assert (await app.gate.authorize("c4", rid(), 49 * CENT, "gpt-4o")).allowed  # -0.99
    blocked = await app.gate.authorize("c4", rid(), 1 * CENT, "gpt-4o")
    assert (blocked.allowed, blocked.code) == (False, "capability_blocked")
    unnamed = await app.gate.authorize("c4", rid(), 1 * CENT, "")
    assert (unnamed.allowed, unnamed.code) == (False, "capability_blocked")
    assert (await app.gate.authorize("c4", rid(), 1 * CENT, "small-model")).allowed  # -1.00
    assert (await app.gate.authorize("c4", rid(), 100 * CENT, "small-model")).allowed  # -2.00
    last = await app.gate.authorize("c4", rid(), 1, "small-model")
    assert (last.allowed, last.code) == (False, "insufficient_balance")  # only at the limit
    # A top-up pays the debt off: the stop-loss lifts by itself.
    await app.accounts.credit("c4", 3 * USD, "payment", rid())
    assert (await app.gate.authorize("c4", rid(), 1 * CENT, "gpt-4o")).allowed


async def test_c4_past_the_stop_loss_point_requests_are_rate_limited(app: App) -> None:
    await fund(app, "c4-rate", 1)
    await app.credit_lines.set(_stop_loss_line("c4-rate", share=1, rate=5))
    answers = [
        await app.gate.authorize("c4-rate", rid(), 1 * CENT, "small-model") for _ in range(20)
    ]
    codes = [a.code for a in answers]
    assert codes.count("rate_limited") >= 10  # 5 a second, in a burst of 20
    assert sum(a.allowed for a in answers) <= 10


async def test_c4_leases_stay_out_of_the_stop_loss_zone(app: App) -> None:
    await fund(app, "c4-lease", 1 * USD)
    await app.credit_lines.set(_stop_loss_line("c4-lease", share=50))
    grant = await app.hot.lease_take("holder", "c4-lease", 10 * USD, 1, 5_000)
    # Free above the stop-loss point (-$1) is $2: a lease gets at most half of it.
    assert grant.granted_micros == 1 * USD


async def test_o3_get_account_shows_the_credit_used(running: RunningGate) -> None:
    admin = running.admin
    await admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id="o3-used"))
    await admin.SetCreditLine(
        admin_pb2.CreditLine(account_id="o3-used", limit_micros=3 * USD, review_every_days=30)
    )
    request = admin_pb2.GetAccountRequest(account_id="o3-used")
    assert (await admin.GetAccount(request)).credit_used_micros == 0
    allowed = await running.gate.Authorize(authorize_request("o3-used", 2 * USD))
    assert allowed.allowed
    account = await admin.GetAccount(request)
    assert (account.balance_micros, account.credit_used_micros) == (-2 * USD, 2 * USD)
