"""Issue 12 item 3: fail_closed voids must never give a request away.

A call that timed out in fail_closed is journaled as a void and, once Redis
answers, undone (it ran) or fenced (it had not). Afterwards a retry with the
same request id must be decided afresh and debited, a void must undo only what
its own attempt wrote, and the voided attempt arriving late must debit nothing.
Each test ends with the ledger exact: Postgres used == what the hot path debited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from balance_gate.app import App
from balance_gate.constants import ScriptCode
from balance_gate.redis_store import Call, ScriptBatcher, VoidResult
from balance_gate.v1 import gate_pb2
from tests.conftest import RunningGate
from tests.faults.conftest import (  # noqa: F401 - the fixture is used by name
    GateThroughProxy,
    assert_audit_clean,
    gate_through_proxy,
)
from tests.helpers import (
    USD,
    authorize_request,
    fund,
    fund_over_grpc,
    rid,
    wait_until_flushed,
)

DEADLINE_S = 2.0
# One timed-out call must not open the breaker: the retry has to reach Redis.
SLOW = {"redis_fail_mode": "fail_closed", "redis_call_timeout_ms": 100, "breaker_failures": 100}
PRICE = 70_000
FUNDS = 10 * USD


async def _until_recovered(running: RunningGate, account_id: str) -> int:
    """Authorize 1-micro probes until the outage journal is settled; micros allowed."""
    allowed = 0
    for _ in range(500):
        answer = await running.gate.Authorize(authorize_request(account_id, 1))
        allowed += 1 if answer.allowed else 0
        await running.app.gate.wait_recovered()
        if running.app.gate.outage_settled:
            return allowed
        await asyncio.sleep(0.01)  # polling for the breaker's next probe, not a race
    raise AssertionError("Redis never came back")


async def _funded(running: RunningGate, account_id: str) -> int:
    """Fund the account and load the authorize script (a late call must not meet
    NOSCRIPT); returns the micros that warm-up debited."""
    await fund_over_grpc(running.admin, account_id, FUNDS)
    assert (await running.gate.Authorize(authorize_request(account_id, 1))).allowed
    return 1


async def _balance(app: App, account_id: str) -> int:
    account = await app.hot.read_account(account_id)
    assert account is not None
    return account.balance_micros


async def _assert_ledger_exact(running: RunningGate, account_id: str, debited: int) -> None:
    """Postgres holds exactly what the hot path debited, and the audit agrees."""
    await wait_until_flushed(running.app)
    row = await running.app.pg.get_account(account_id)
    assert row is not None
    assert row.used_micros == debited
    assert await running.app.pg.usage_total(account_id) == debited
    assert await _balance(running.app, account_id) == FUNDS - debited
    await assert_audit_clean(running.app)


async def _until(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _record_authorize_calls(app: App) -> list[tuple[Sequence[str], Sequence[str]]]:
    """Every authorize script call the sidecar sends: (KEYS, ARGV), to replay one later
    exactly as a late arrival in Redis would run it."""
    batcher: ScriptBatcher = app.hot._authorize
    sent: list[tuple[Sequence[str], Sequence[str]]] = []
    original = batcher.call

    def call(keys: Sequence[str], args: Sequence[str]) -> Call:
        sent.append((keys, args))
        return original(keys, args)

    batcher.call = call  # type: ignore[method-assign]
    return sent


async def _run_late(
    redis_client: aioredis.Redis, app: App, keys: Sequence[str], args: Sequence[str]
) -> None:
    """Run an authorize call in Redis as if it arrived now (late), bypassing the sidecar."""
    batcher: ScriptBatcher = app.hot._authorize
    await redis_client.script_load(batcher._source)
    await redis_client.evalsha(batcher._sha, len(keys), *keys, *args)


async def test_issue_12_item_3a_a_retry_after_a_void_that_ran_is_debited(
    gate_through_proxy: GateThroughProxy,  # noqa: F811
    redis_client: aioredis.Redis,
) -> None:
    """The timed-out call ran late and was settled to 0 by its void; the proxy's retry
    of that request id was then answered allowed + replayed and never charged."""
    async with gate_through_proxy(**SLOW) as (running, proxy):
        warm = await _funded(running, "acme")
        request = authorize_request("acme", PRICE)
        record_key = running.app.hot.keys.request("acme", request.request_id)

        proxy.set("pass", delay_s=0.4)  # longer than the call timeout: it runs, late
        first = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert (first.allowed, first.code) == (False, "unavailable")

        async def ran() -> bool:
            return bool(await redis_client.exists(record_key))

        await _until(ran)  # it did run in Redis (read past the proxy)
        proxy.set("pass")
        probes = warm + await _until_recovered(running, "acme")
        assert await _balance(running.app, "acme") == FUNDS - probes  # the void gave it back

        retry = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert retry.allowed
        assert not retry.replayed, "a voided request id must be decided afresh"
        assert await _balance(running.app, "acme") == FUNDS - probes - PRICE
        again = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert again.allowed
        assert again.replayed
        settled = await running.gate.Settle(
            gate_pb2.SettleRequest(
                account_id="acme", request_id=request.request_id, amount_micros=PRICE // 2
            )
        )
        assert settled.delta_micros == -(PRICE // 2)
        await _assert_ledger_exact(running, "acme", probes + PRICE // 2)


async def test_issue_12_item_3a_a_retry_after_a_fence_is_debited_and_the_late_call_is_not(
    gate_through_proxy: GateThroughProxy,  # noqa: F811
    redis_client: aioredis.Redis,
) -> None:
    """The timed-out call had not reached Redis: its void fenced the request id with a
    record '<amount>:0'; the retry found it and was allowed + replayed for free. After the
    fix the retry is debited, and the voided call arriving later still debits nothing."""
    async with gate_through_proxy(**SLOW) as (running, proxy):
        warm = await _funded(running, "acme")
        sent = _record_authorize_calls(running.app)
        request = authorize_request("acme", PRICE)

        proxy.set("blackhole")  # sent, never delivered
        first = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert (first.allowed, first.code) == (False, "unavailable")
        [(late_keys, late_args)] = [c for c in sent if request.request_id in c[1]]
        proxy.set("reset")  # the held bytes die with the connection
        proxy.set("pass")
        probes = warm + await _until_recovered(running, "acme")
        assert await _balance(running.app, "acme") == FUNDS - probes

        # The voided call shows up now (a slow network): it must debit nothing.
        await _run_late(redis_client, running.app, late_keys, late_args)
        assert await _balance(running.app, "acme") == FUNDS - probes

        retry = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert retry.allowed
        assert not retry.replayed, "a fenced request id must be decided afresh"
        assert await _balance(running.app, "acme") == FUNDS - probes - PRICE

        # ... and once more after the retry was decided: still nothing.
        await _run_late(redis_client, running.app, late_keys, late_args)
        assert await _balance(running.app, "acme") == FUNDS - probes - PRICE
        again = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert again.allowed
        assert again.replayed
        await _assert_ledger_exact(running, "acme", probes + PRICE)


async def test_issue_12_item_3b_a_timed_out_retry_never_voids_the_original_debit(
    gate_through_proxy: GateThroughProxy,  # noqa: F811
) -> None:
    """The request was allowed and debited; a retry of it timed out and was journaled as
    a void, which settled the ORIGINAL debit to 0: the allowed request became free."""
    async with gate_through_proxy(**SLOW) as (running, proxy):
        warm = await _funded(running, "acme")
        request = authorize_request("acme", PRICE)
        first = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert first.allowed
        assert not first.replayed

        proxy.set("pass", delay_s=0.4)
        retry = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert (retry.allowed, retry.code) == (False, "unavailable")
        proxy.set("pass")
        probes = warm + await _until_recovered(running, "acme")

        assert await _balance(running.app, "acme") == FUNDS - probes - PRICE
        # The proxy that was told "allowed" settles its request: a normal settle.
        settled = await running.gate.Settle(
            gate_pb2.SettleRequest(
                account_id="acme", request_id=request.request_id, amount_micros=PRICE
            )
        )
        assert settled.delta_micros == 0
        await _assert_ledger_exact(running, "acme", probes + PRICE)


async def test_issue_12_item_3_a_replay_that_relied_on_a_late_write_keeps_its_debit(
    gate_through_proxy: GateThroughProxy,  # noqa: F811
    redis_client: aioredis.Redis,
) -> None:
    """The timed-out call ran late; before its void ran, the proxy's retry reached Redis
    and was answered allowed + replayed from that late write. The void must then leave
    the debit alone (the retry relies on it): voiding it would make the retry free."""
    async with gate_through_proxy(**SLOW, breaker_open_ms=60_000) as (running, proxy):
        warm = await _funded(running, "acme")
        request = authorize_request("acme", PRICE)
        record_key = running.app.hot.keys.request("acme", request.request_id)

        proxy.set("pass", delay_s=0.4)
        first = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert (first.allowed, first.code) == (False, "unavailable")

        async def ran() -> bool:
            return bool(await redis_client.exists(record_key))

        await _until(ran)
        proxy.set("pass")
        # The retry goes to Redis at once (the breaker is closed); it is the call
        # whose answer starts the recovery, so it runs before the void.
        retry = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert retry.allowed
        probes = warm + await _until_recovered(running, "acme")
        assert await _balance(running.app, "acme") == FUNDS - probes - PRICE
        await _assert_ledger_exact(running, "acme", probes + PRICE)


async def test_issue_12_item_3_repeated_voids_of_one_request_id_keep_the_ledger_exact(
    gate_through_proxy: GateThroughProxy,  # noqa: F811
    redis_client: aioredis.Redis,
) -> None:
    """Three attempts of one id run late and are voided in turn, then one is answered:
    the ledger accepts every re-decision (its (account, request, kind) key is unique)."""
    async with gate_through_proxy(**SLOW) as (running, proxy):
        warm = await _funded(running, "acme")
        request = authorize_request("acme", PRICE)
        probes = warm
        for _ in range(3):
            before = await redis_client.get(
                running.app.hot.keys.request("acme", request.request_id)
            )
            proxy.set("pass", delay_s=0.4)
            answer = await running.gate.Authorize(request, timeout=DEADLINE_S)
            assert not answer.allowed

            async def changed(previous: Any = before) -> bool:
                key = running.app.hot.keys.request("acme", request.request_id)
                return bool(await redis_client.get(key) != previous)

            await _until(changed)  # the late call wrote its own record
            proxy.set("pass")
            probes += await _until_recovered(running, "acme")
            assert await _balance(running.app, "acme") == FUNDS - probes
        final = await running.gate.Authorize(request, timeout=DEADLINE_S)
        assert final.allowed
        assert not final.replayed
        await _assert_ledger_exact(running, "acme", probes + PRICE)


async def test_request_records_of_the_previous_format_still_parse(app: App) -> None:
    """Rolling upgrade: records written before attempt tokens ('<a>', '<a>:<s>') are
    live decisions that no void undoes (they name no attempt)."""
    await fund(app, "acme", FUNDS)
    assert (await app.gate.authorize("acme", rid(), 1, "")).allowed  # loads the account
    hot = app.hot
    await hot.client.set(hot.keys.request("acme", "old-1"), str(PRICE))
    await hot.client.set(hot.keys.request("acme", "old-2"), f"{PRICE}:{PRICE // 2}")

    replay = await hot.authorize("acme", "old-1", PRICE, "", attempt="a1")
    assert (replay.code, replay.replayed) == (ScriptCode.OK, True)
    mismatch = await hot.authorize("acme", "old-1", PRICE + 1, "", attempt="a2")
    assert mismatch.code == ScriptCode.AMOUNT_MISMATCH
    assert await hot.void_attempt("acme", "old-1", "a1") == VoidResult.DONE
    assert await hot.request_record("acme", "old-1") == str(PRICE)  # pinned, untouched
    settled = await hot.settle("acme", "old-1", PRICE // 4)
    assert (settled.code, settled.value) == (ScriptCode.OK, PRICE // 4 - PRICE)

    again = await hot.settle("acme", "old-2", PRICE // 2)
    assert (again.code, again.replayed) == (ScriptCode.OK, True)
    refused = await hot.settle("acme", "old-2", PRICE)
    assert refused.code == ScriptCode.ALREADY_SETTLED
    assert await hot.void_attempt("acme", "old-2", "a3") == VoidResult.DONE


async def test_issue_12_item_3_a_debit_is_undone_only_when_every_answered_attempt_was_voided(
    app: App,
) -> None:
    """Script level: the writer and a replay both timed out (both voided): nobody was
    answered allowed, so the debit goes back; the next attempt is generation 1. A request
    replayed by more attempts than the record names is pinned: no void undoes it."""
    await fund(app, "acme", FUNDS)
    hot = app.hot
    assert (await hot.authorize("acme", "r", PRICE, "", attempt="aa1")).code == ScriptCode.OK
    assert (await hot.authorize("acme", "r", PRICE, "", attempt="aa2")).replayed
    assert await hot.void_attempt("acme", "r", "aa1") == VoidResult.KEPT
    assert await hot.void_attempt("acme", "r", "aa2") == VoidResult.UNDONE
    assert await _balance(app, "acme") == FUNDS
    retry = await hot.authorize("acme", "r", PRICE, "", attempt="aa3")
    assert (retry.code, retry.replayed) == (ScriptCode.OK, False)
    assert await _balance(app, "acme") == FUNDS - PRICE

    assert (await hot.authorize("acme", "p", PRICE, "", attempt="bb0")).code == ScriptCode.OK
    for n in range(1, 6):
        assert (await hot.authorize("acme", "p", PRICE, "", attempt=f"bb{n}")).replayed
    for n in range(6):
        assert await hot.void_attempt("acme", "p", f"bb{n}") != VoidResult.UNDONE
    assert await _balance(app, "acme") == FUNDS - 2 * PRICE

    await app.flusher.drain()
    rows = await app.pg._pool.fetch(
        "SELECT request_id, kind, amount_micros FROM usage_events"
        " WHERE account_id = 'acme' AND request_id LIKE 'r%' ORDER BY request_id, kind"
    )
    assert [(r["request_id"], r["kind"], r["amount_micros"]) for r in rows] == [
        ("r", "authorize", PRICE),
        ("r", "settle", -PRICE),
        ("r\x1f1", "authorize", PRICE),
    ]
