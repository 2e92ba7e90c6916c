"""An allowed answer warns when the balance runs low with no top-up coming (low_balance),
and shadow mode allows what the gate would deny, counting it (issue 7)."""

from __future__ import annotations

from balance_gate import metrics
from balance_gate.app import App
from balance_gate.client import GateClient
from balance_gate.settings import Settings
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund, fund_over_grpc, rid

CENT = 10_000


async def test_low_balance_is_flagged_under_the_warning_level_without_auto_top_up(
    settings: Settings,
) -> None:
    async with App.opened(
        settings.model_copy(update={"low_balance_warning_micros": 50 * CENT}), migrate=False
    ) as app:
        await fund(app, "acme", USD)
        above = await app.gate.authorize("acme", rid(), 40 * CENT, "")  # leaves 60 cents
        under = await app.gate.authorize("acme", rid(), 20 * CENT, "")  # leaves 40 cents
        assert above.allowed
        assert not above.low_balance
        assert under.allowed
        assert under.low_balance


async def test_low_balance_waits_for_the_cap_when_auto_top_up_is_armed(app: App) -> None:
    """Armed, the threshold is the level, and the flag says "capped": a top-up is coming
    otherwise (P3), so the warning would be noise."""
    await app.hot.ensure_top_up_groups()
    await fund(app, "acme", USD)
    await app.topups.set_payment_methods("acme", "pm_card_visa", "")
    await app.topups.set_auto_top_up("acme", True, 50 * CENT, 2 * USD, 10 * USD, 0)
    armed = await app.gate.authorize("acme", rid(), 60 * CENT, "")  # under the threshold
    assert armed.allowed
    assert not armed.low_balance  # a top-up is on its way
    await app.hot.mark_top_up_capped("acme", 60)  # what the worker does on daily_cap
    capped = await app.gate.authorize("acme", rid(), CENT, "")
    assert capped.allowed
    assert capped.low_balance


async def test_shadow_mode_allows_would_be_denials_and_debits_nothing(
    settings: Settings,
) -> None:
    async with App.opened(
        settings.model_copy(update={"shadow_accounts": "shadow-"}), migrate=False
    ) as app:
        await fund(app, "shadow-1", CENT)
        await fund(app, "live-1", CENT)
        before = metrics.SHADOW_ALLOWED.labels("insufficient_balance")._value.get()
        paid = await app.gate.authorize("shadow-1", rid(), CENT, "")
        unpaid = await app.gate.authorize("shadow-1", rid(), CENT, "")
        live = await app.gate.authorize("live-1", rid(), 2 * CENT, "")
        assert paid.allowed
        assert not paid.shadow
        assert unpaid.allowed
        assert unpaid.shadow
        assert unpaid.code == "insufficient_balance"
        assert not live.allowed  # not a shadow account: denied as usual
        after = metrics.SHADOW_ALLOWED.labels("insufficient_balance")._value.get()
        assert after - before == 1
        hot = await app.hot.read_account("shadow-1")
        assert hot is not None
        assert hot.balance_micros == 0  # the first debited, the shadowed one did not
        unknown = await app.gate.authorize("shadow-nobody", rid(), CENT, "")
        assert unknown.allowed
        assert unknown.code == "account_not_found"


async def test_the_grpc_answer_carries_low_balance(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "acme", 150 * CENT)  # default warning level: $1
    first = await running.gate.Authorize(authorize_request("acme", 40 * CENT))
    second = await running.gate.Authorize(authorize_request("acme", 40 * CENT))
    assert not first.low_balance  # $1.10 left
    assert second.low_balance  # 70 cents left
    assert not second.shadow


async def test_the_python_client_sees_low_balance(running: RunningGate) -> None:
    await fund_over_grpc(running.admin, "acme", 150 * CENT)
    async with GateClient(f"127.0.0.1:{running.listening.gate_port}") as gate:
        first = await gate.authorize("acme", rid(), 40 * CENT)
        second = await gate.authorize("acme", rid(), 40 * CENT)
    assert not first.low_balance
    assert second.low_balance
