"""Balance leasing in one process: two Apps on one Redis stand for two sidecars.

The three-process test is tests/integration/test_lease_processes.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from balance_gate.app import App
from balance_gate.leases import LeaseManager
from balance_gate.redis_store import LeaseReport
from balance_gate.settings import Settings
from tests.helpers import USD, fund, ledger_balance, rid, wait_until_flushed

CENT = 10_000
Sidecar = Callable[..., AsyncIterator[App]]


def _leasing(settings: Settings, **overrides: object) -> Settings:
    return Settings.model_validate(
        {
            **settings.model_dump(),
            "lease_accounts": "*",
            "lease_min_rate": 1,
            "lease_report_interval_ms": 5,
            "lease_recall_wait_ms": 500,
            **overrides,
        }
    )


@asynccontextmanager
async def sidecar(settings: Settings, *, reporting: bool = True) -> AsyncIterator[App]:
    """An App with its lease reporter running (unless told otherwise) and its flusher."""
    app = await App.open(settings, migrate=False)
    await app.hot.ensure_usage_groups()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(app.flusher.run(stop))]
    if reporting and app.leases is not None:
        tasks.append(asyncio.create_task(app.leases.run(stop)))
    try:
        yield app
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await app.close()


def leases_of(app: App) -> LeaseManager:
    assert app.leases is not None
    return app.leases


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll a condition the system's own work makes true (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_busy_account_gets_a_lease_and_every_request_is_charged_once(
    settings: Settings,
) -> None:
    """Traffic makes a lease; leased decisions reach the ledger exactly once each."""
    async with sidecar(_leasing(settings)) as app:
        await fund(app, "busy", 10 * USD)
        leases = leases_of(app)
        allowed = 0

        async def spend_until_leased() -> bool:
            nonlocal allowed
            decision = await app.gate.authorize("busy", rid(), CENT, "")
            allowed += decision.allowed
            return leases.held("busy") > 0

        await eventually(spend_until_leased)  # about a second of traffic opens a lease
        for _ in range(300):
            decision = await app.gate.authorize("busy", rid(), CENT, "")
            allowed += decision.allowed
        assert leases.held("busy") < 10 * USD  # a lease holds part of it, not all
        hot = await app.hot.read_account("busy")
        assert hot is not None
        assert hot.leased_micros > 0  # some money sits in the lease ...
        # ... and the customer still sees it as theirs.
        await leases.close()
        await wait_until_flushed(app)
        assert await ledger_balance(app, "busy") == 10 * USD - allowed * CENT
        account = await app.accounts.get("busy")
        assert account.balance_micros == 10 * USD - allowed * CENT
        hot = await app.hot.read_account("busy")
        assert hot is not None
        assert hot.leased_micros == 0


async def test_leased_request_replays_locally_and_settles_at_once(settings: Settings) -> None:
    async with sidecar(_leasing(settings)) as app:
        await fund(app, "quick", 1 * USD)
        assert await leases_of(app).acquire("quick", 20 * CENT) == 20 * CENT
        first = await app.gate.authorize("quick", "r1", CENT, "")
        again = await app.gate.authorize("quick", "r1", CENT, "")
        assert first.allowed
        assert not first.replayed
        assert again.replayed
        # Settle right away: the lease reports r1 first, so its record exists.
        settled = await app.gate.settle("quick", "r1", 3 * CENT)
        assert settled.delta_micros == 2 * CENT
        await leases_of(app).close()
        await wait_until_flushed(app)
        assert await ledger_balance(app, "quick") == 1 * USD - 3 * CENT


async def test_recall_lets_another_sidecar_spend_leased_money(settings: Settings) -> None:
    """Never insufficient_balance while a live sidecar's lease could pay."""
    leasing = _leasing(settings)
    # A loaded machine can keep the holder from answering a recall for a while.
    patient = settings.model_copy(update={"lease_recall_wait_ms": 5_000})
    async with sidecar(leasing) as holder, sidecar(patient) as other:
        await fund(holder, "shared", 1 * USD)
        granted = await leases_of(holder).acquire("shared", 40 * CENT)
        assert granted == 40 * CENT
        # The other sidecar spends all of it, the leased 40 cents included.
        answers = [await other.gate.authorize("shared", rid(), CENT, "") for _ in range(100)]
        assert all(a.allowed for a in answers), [a.code for a in answers if not a.allowed][:3]
        last = await other.gate.authorize("shared", rid(), CENT, "")
        assert not last.allowed
        assert last.code == "insufficient_balance"
        assert leases_of(holder).held("shared") == 0
        await wait_until_flushed(other)
        assert await ledger_balance(other, "shared") == 0


async def test_dead_sidecars_lease_comes_back_after_it_expires(settings: Settings) -> None:
    async with (
        sidecar(_leasing(settings, lease_ttl_ms=400), reporting=False) as dead,
        sidecar(_leasing(settings, lease_recall_wait_ms=20)) as alive,
    ):
        await fund(alive, "orphan", 1 * USD)
        assert await leases_of(dead).acquire("orphan", 50 * CENT) == 50 * CENT
        # `dead` never reports or returns: it stands for a sidecar killed with -9.
        account = await alive.accounts.get("orphan")
        assert account.balance_micros == 1 * USD  # leased money is still the customer's
        spent = 0
        for _ in range(50):
            spent += (await alive.gate.authorize("orphan", rid(), CENT, "")).allowed
        assert spent == 50

        async def the_rest_is_spendable() -> bool:
            nonlocal spent
            spent += (await alive.gate.authorize("orphan", rid(), CENT, "")).allowed
            return spent == 100

        await eventually(the_rest_is_spendable, timeout_s=10)
        assert not (await alive.gate.authorize("orphan", rid(), CENT, "")).allowed
        await leases_of(alive).close()
        await wait_until_flushed(alive)
        assert await ledger_balance(alive, "orphan") == 0


async def test_request_decided_on_two_sidecars_is_charged_once(settings: Settings) -> None:
    """A proxy retried one request on another sidecar: both allow it, the ledger has it once."""
    async with sidecar(_leasing(settings)) as leased, sidecar(settings) as plain:
        await fund(leased, "retry", 1 * USD)
        assert await leases_of(leased).acquire("retry", 30 * CENT) > 0
        assert (await leased.gate.authorize("retry", "same", 5 * CENT, "")).allowed
        assert (await plain.gate.authorize("retry", "same", 5 * CENT, "")).allowed
        await leases_of(leased).close()
        await wait_until_flushed(plain)
        assert await ledger_balance(plain, "retry") == 1 * USD - 5 * CENT
        rows = await plain.pool.fetchval(
            "SELECT count(*) FROM usage_events WHERE account_id = $1 AND request_id = $2",
            "retry",
            "same",
        )
        assert rows == 1


@pytest.mark.parametrize("concurrency", [64])
async def test_leased_and_plain_traffic_race_without_overspending(
    settings: Settings, concurrency: int
) -> None:
    """Two sidecars, one leasing, 300 concurrent requests for 200 cents: exactly 200 allowed."""
    async with sidecar(_leasing(settings)) as leased, sidecar(settings) as plain:
        await fund(leased, "race", 2 * USD)
        await leases_of(leased).acquire("race", 60 * CENT)
        gates = [leased.gate, plain.gate]
        room = asyncio.Semaphore(concurrency)

        async def one(i: int) -> bool:
            async with room:
                return (await gates[i % 2].authorize("race", f"r{i}", CENT, "")).allowed

        answers = await asyncio.gather(*(one(i) for i in range(300)))
        assert sum(answers) == 200
        await leases_of(leased).close()
        await wait_until_flushed(plain)
        assert await ledger_balance(plain, "race") == 0


async def test_disabling_an_account_recalls_its_leases(settings: Settings) -> None:
    """A disabled account stops being allowed from memory within about 100 ms."""
    async with sidecar(_leasing(settings)) as app:
        await fund(app, "gone", 1 * USD)
        assert await leases_of(app).acquire("gone", 20 * CENT) > 0
        allowed = int((await app.gate.authorize("gone", rid(), CENT, "")).allowed)
        await app.accounts.set_status("gone", "disabled")

        async def denied() -> bool:
            nonlocal allowed
            decision = await app.gate.authorize("gone", rid(), CENT, "")
            allowed += decision.allowed
            return decision.code == "account_disabled"

        await eventually(denied, timeout_s=5)
        assert leases_of(app).held("gone") == 0
        await wait_until_flushed(app)
        assert await ledger_balance(app, "gone") == 1 * USD - allowed * CENT


async def test_a_failed_return_keeps_the_unreported_uses(settings: Settings) -> None:
    """Redis fails once as a lease goes back: nothing allowed from it is lost."""
    async with sidecar(_leasing(settings), reporting=False) as app:
        await fund(app, "flaky", 1 * USD)
        leases = leases_of(app)
        assert await leases.acquire("flaky", 30 * CENT) > 0
        for _ in range(5):
            assert (await app.gate.authorize("flaky", rid(), CENT, "")).allowed
        real_report = app.hot.lease_report
        failures: list[int] = []

        async def fails_once(*args: Any, **kwargs: Any) -> LeaseReport:
            if not failures:
                failures.append(1)
                raise RedisConnectionError("injected: Redis went away")
            return await real_report(*args, **kwargs)

        app.hot.lease_report = fails_once  # type: ignore[method-assign]
        with pytest.raises(RedisConnectionError):
            await leases.release("flaky")
        assert not (await app.gate.authorize("flaky", rid(), CENT, "")).replayed
        await leases.release("flaky")  # the next round succeeds
        await wait_until_flushed(app)
        assert await ledger_balance(app, "flaky") == 1 * USD - 6 * CENT
        hot = await app.hot.read_account("flaky")
        assert hot is not None
        assert hot.leased_micros == 0
