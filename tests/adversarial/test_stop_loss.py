"""Issue 13 item 8: the C4 stop-loss was easy to step past.

C4: once consumption passes the approved point, high-cost capabilities are
paused first. The line below is $10 with the stop point at half of it (-$5).

- The check used the balance before the debit: one $5 `gpt-4o` request from
  -$4.90 was allowed and took the balance to -$9.90.
- Capability names were compared byte for byte: past the stop point `gpt-4o`
  was blocked but `GPT-4o`, `gpt-4o ` and an empty capability were paid.
- A lease decided `gpt-4o` in memory, never seeing the stop point.
- A line stored before names were normalized (`' GPT-4o'`) blocked nothing
  once loaded again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from balance_gate.app import App
from balance_gate.credit_lines import CreditLine
from balance_gate.errors import InvalidArgument
from balance_gate.settings import Settings
from tests.helpers import USD, fund, rid, with_settings

CENT = 10_000
PLAIN = "small-model"  # a capability the line does not name


def _line(account_id: str, *capabilities: str) -> CreditLine:
    return CreditLine(
        account_id=account_id,
        limit_micros=10 * USD,
        deposit_micros=0,
        review_every_days=30,
        next_review_on=dt.date.today(),
        high_cost_capabilities=capabilities or ("gpt-4o",),
        stop_loss_share_pct=50,  # the stop point is -$5; the floor -$10
    )


async def _at_balance(app: App, account_id: str, balance_micros: int) -> None:
    """A funded account with the line, spent down to `balance_micros` by a plain request."""
    await fund(app, account_id, 10 * CENT)
    await app.credit_lines.set(_line(account_id))
    spent = await app.gate.authorize(account_id, rid(), 10 * CENT - balance_micros, PLAIN)
    assert (spent.allowed, spent.balance_micros) == (True, balance_micros)


async def test_issue_13_item_8_c4_is_checked_on_the_balance_after_the_debit(app: App) -> None:
    """C4: from -$4.90, one $5 gpt-4o request would end at -$9.90, past the stop point:
    it is blocked. Before the fix the check saw -$4.90 and allowed it."""
    await _at_balance(app, "c4-after", -490 * CENT)
    big = await app.gate.authorize("c4-after", rid(), 5 * USD, "gpt-4o")
    assert (big.allowed, big.code) == (False, "capability_blocked")


async def test_issue_13_item_8_c4_a_debit_landing_on_the_stop_point_is_past_it(
    app: App,
) -> None:
    """C4 boundary: from -$4.90, $0.10 of gpt-4o lands exactly on -$5: treated as past it;
    $0.09 (ending at -$4.99) is still paid."""
    await _at_balance(app, "c4-edge", -490 * CENT)
    landing = await app.gate.authorize("c4-edge", rid(), 10 * CENT, "gpt-4o")
    assert (landing.allowed, landing.code) == (False, "capability_blocked")
    short = await app.gate.authorize("c4-edge", rid(), 9 * CENT, "gpt-4o")
    assert (short.allowed, short.balance_micros) == (True, -499 * CENT)


@pytest.mark.parametrize("spelling", ["GPT-4o", "gpt-4o ", " Gpt-4O "])
async def test_issue_13_item_8_c4_capability_names_are_normalized(app: App, spelling: str) -> None:
    """C4: past the stop point, another case or surrounding space is the same capability.
    Before the fix `GPT-4o` and `gpt-4o ` were paid while `gpt-4o` was blocked."""
    await _at_balance(app, "c4-case", -990 * CENT)
    exact = await app.gate.authorize("c4-case", rid(), 5 * CENT, "gpt-4o")
    assert (exact.allowed, exact.code) == (False, "capability_blocked")
    spelled = await app.gate.authorize("c4-case", rid(), 5 * CENT, spelling)
    assert (spelled.allowed, spelled.code) == (False, "capability_blocked")


@pytest.mark.parametrize("missing", ["", "   "])
async def test_issue_13_item_8_c4_an_empty_capability_is_blocked_past_the_stop_point(
    app: App, missing: str
) -> None:
    """C4: on a line that names high-cost capabilities, a request naming none could be
    hiding one: past the stop point it is blocked (before the fix it was paid). A
    request naming a capability outside the list is still paid, down to the limit."""
    await _at_balance(app, "c4-empty", -990 * CENT)
    unnamed = await app.gate.authorize("c4-empty", rid(), 5 * CENT, missing)
    assert (unnamed.allowed, unnamed.code) == (False, "capability_blocked")
    plain = await app.gate.authorize("c4-empty", rid(), 5 * CENT, PLAIN)
    assert (plain.allowed, plain.balance_micros) == (True, -995 * CENT)


async def test_issue_13_item_8_c4_a_stored_unnormalized_line_is_normalized_on_load(
    app: App,
) -> None:
    """C4: a line written before normalization (' GPT-4o' in Postgres) blocks gpt-4o once
    the account is loaded again from Postgres; GetCreditLine reads it normalized."""
    await _at_balance(app, "c4-load", -990 * CENT)
    async with app.pool.acquire() as conn:
        await conn.execute(
            "UPDATE credit_lines SET high_cost_capabilities = $2 WHERE account_id = $1",
            "c4-load",
            [" GPT-4o"],
        )
    await app.flusher.drain()
    await app.redis.delete(app.hot.keys.account("c4-load"))  # loaded again from Postgres
    blocked = await app.gate.authorize("c4-load", rid(), 5 * CENT, "gpt-4o")
    assert (blocked.allowed, blocked.code) == (False, "capability_blocked")
    assert (await app.credit_lines.get("c4-load")).high_cost_capabilities == ("gpt-4o",)


async def test_issue_13_item_8_c4_set_credit_line_stores_normalized_names(app: App) -> None:
    """C4: the names a line is given are normalized where they are stored."""
    await fund(app, "c4-set", 10 * CENT)
    stored = await app.credit_lines.set(_line("c4-set", " GPT-4o ", "o1", "O1"))
    assert stored.high_cost_capabilities == ("gpt-4o", "o1")
    with pytest.raises(InvalidArgument, match="high_cost_capabilities"):
        await app.credit_lines.set(_line("c4-set", "gpt-4o", "  "))


@asynccontextmanager
async def _leasing(settings: Settings) -> AsyncIterator[App]:
    """An App that may lease every account; no reporter runs, so leases stay put."""
    app = await App.open(with_settings(settings, lease_accounts="*"), migrate=False)
    await app.hot.ensure_usage_groups()
    try:
        yield app
    finally:
        await app.close()


async def test_issue_13_item_8_c4_a_lease_does_not_decide_high_cost_in_memory(
    settings: Settings,
) -> None:
    """C4 on the leased path: a lease taken above the stop point kept paying gpt-4o from
    memory after other traffic took the balance to the stop point. High-cost (and
    unnamed) requests on such a line are decided by the script, which sees it."""
    async with _leasing(settings) as app:
        assert app.leases is not None
        await fund(app, "c4-lease", 5 * USD)
        await app.credit_lines.set(_line("c4-lease"))
        # $10 free above the stop point: the lease gets half of it.
        assert await app.leases.acquire("c4-lease", 5 * USD) == 5 * USD
        # Another sidecar's plain traffic (straight to Redis) ends at the stop point.
        plain = await app.hot.authorize("c4-lease", rid(), 10 * USD, PLAIN)
        assert (plain.code, plain.balance_micros) == (0, -5 * USD)
        leased = await app.gate.authorize("c4-lease", rid(), 10 * CENT, "gpt-4o")
        assert (leased.allowed, leased.code) == (False, "capability_blocked")
        still_plain = await app.gate.authorize("c4-lease", rid(), 10 * CENT, PLAIN)
        assert still_plain.allowed
