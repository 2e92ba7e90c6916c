"""AuthorizeStream: many requests in flight on one stream, answers matched by request_id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc

from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund_over_grpc, rid


async def _stream(
    running: RunningGate, requests: Iterable[gate_pb2.AuthorizeRequest]
) -> dict[str, gate_pb2.AuthorizeResponse]:
    """Send every request on one stream; return the answers by request_id."""
    sent = list(requests)

    async def feed() -> AsyncIterator[gate_pb2.AuthorizeRequest]:
        for request in sent:
            yield request

    answers: dict[str, gate_pb2.AuthorizeResponse] = {}
    async for answer in running.gate.AuthorizeStream(feed()):
        assert answer.request_id not in answers, "one answer per request"
        answers[answer.request_id] = answer
    assert set(answers) == {r.request_id for r in sent}
    return answers


async def test_p1_stream_of_1000_never_overdraws(running: RunningGate) -> None:
    """P1 on a stream: $5.00 pays for exactly 500 requests of $0.01, decided concurrently."""
    await fund_over_grpc(running.admin, "streamer", 5 * USD)
    answers = await _stream(running, (authorize_request("streamer", 10_000) for _ in range(1_000)))
    allowed = [a for a in answers.values() if a.allowed]
    assert len(allowed) == 500
    assert {a.code for a in answers.values() if not a.allowed} == {"insufficient_balance"}
    assert sorted(a.balance_micros for a in allowed) == list(range(0, 5 * USD, 10_000))
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="streamer"))
    assert account.balance_micros == 0


async def test_bad_request_on_a_stream_is_answered_alone(running: RunningGate) -> None:
    """One invalid request gets its own INVALID_ARGUMENT answer; the stream goes on."""
    await fund_over_grpc(running.admin, "mixed", 1 * USD)
    good_before, good_after = rid(), rid()
    answers = await _stream(
        running,
        [
            authorize_request("mixed", 100_000, good_before),
            authorize_request("mixed", -5, "bad-amount"),
            authorize_request("", 1, "no-account"),
            authorize_request("mixed", 100_000, good_after),
        ],
    )
    assert answers[good_before].allowed
    assert answers[good_after].allowed
    bad = answers["bad-amount"]
    assert not bad.allowed
    assert bad.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "amount_micros" in bad.status_message
    assert "account_id" in answers["no-account"].status_message
    assert answers[good_after].status_code == 0
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="mixed"))
    assert account.balance_micros == 800_000


async def test_stream_and_unary_share_idempotency(running: RunningGate) -> None:
    """A request_id decided on a stream is a replay on Authorize, and the other way round."""
    await fund_over_grpc(running.admin, "both", 1 * USD)
    first = await running.gate.Authorize(authorize_request("both", 250_000, "r-unary"))
    answers = await _stream(
        running,
        [
            authorize_request("both", 250_000, "r-unary"),
            authorize_request("both", 250_000, "r-stream"),
        ],
    )
    assert first.allowed
    assert answers["r-unary"].replayed
    assert not answers["r-stream"].replayed
    again = await running.gate.Authorize(authorize_request("both", 250_000, "r-stream"))
    assert again.replayed
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="both"))
    assert account.balance_micros == 500_000


async def test_unknown_account_on_a_stream(running: RunningGate) -> None:
    answers = await _stream(running, [authorize_request("nobody-here", 1, "r1")])
    assert not answers["r1"].allowed
    assert answers["r1"].code == "account_not_found"


async def test_streams_in_parallel_debit_exactly(running: RunningGate) -> None:
    """Four streams at once, 250 requests each, on one account: every cent accounted for."""
    await fund_over_grpc(running.admin, "parallel", 100 * USD)
    results = await asyncio.gather(
        *(
            _stream(running, (authorize_request("parallel", 1_000) for _ in range(250)))
            for _ in range(4)
        )
    )
    assert all(a.allowed for answers in results for a in answers.values())
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="parallel"))
    assert account.balance_micros == 100 * USD - 1_000 * 1_000
