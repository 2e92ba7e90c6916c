"""Issue 12 item 9: corrupt or non-UTF-8 protobufs on the gate port.

Before: Authorize and Settle answered UNKNOWN with "Exception deserializing
request!" / DecodeError in the details, and one such message on an
AuthorizeStream ended the whole stream, losing every other request's answer.
After: INVALID_ARGUMENT naming what was wrong; on a stream the bad message is
answered alone (status_code 3) and every good one is answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, authorize_request, fund_over_grpc, rid

ACCOUNT = "malformed-victim"
SERVICE = "/balance_gate.v1.BalanceGate"

# (raw message, what the error message must name)
CORRUPT: dict[str, tuple[bytes, str]] = {
    # field 1 (account_id) is 2 bytes that are not UTF-8
    "non-UTF-8 account_id": (b"\x0a\x02\xff\xfe\x12\x02r1\x18\x01", "account_id"),
    # field 2 (request_id) holds a lone continuation byte
    "non-UTF-8 request_id": (b"\x0a\x01a\x12\x01\x80\x18\x01", "request_id"),
    # field 1 says 5 bytes follow, 2 do
    "truncated field": (b"\x0a\x05ab", "truncated"),
    # wire type 7 does not exist
    "invalid wire type": (b"\x0f\x01", "wire type"),
    # field number 0 is reserved
    "field number 0": (b"\x00\x01", "field number"),
    # a varint of 11 bytes
    "overlong varint": (b"\x18" + b"\xff" * 10 + b"\x01", "varint"),
}


def _no_python_in(details: str) -> None:
    for leak in ("DecodeError", "Traceback", "Exception", "Error parsing"):
        assert leak not in details, details


def _raw_unary(running: RunningGate, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    # no serializers: the bytes go out, and come back, as they are
    return running.gate_channel.unary_unary(
        f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None
    )


@pytest.mark.parametrize("method", ["Authorize", "Settle"])
@pytest.mark.parametrize("case", sorted(CORRUPT))
async def test_issue_12_item_9_corrupt_unary_message_is_invalid_argument(
    running: RunningGate, method: str, case: str
) -> None:
    raw, named = CORRUPT[case]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _raw_unary(running, method)(raw)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    details = raised.value.details() or ""
    assert named in details
    _no_python_in(details)


async def test_issue_12_item_9_bad_messages_on_a_stream_cost_no_other_answer(
    running: RunningGate,
) -> None:
    """Good and corrupt messages interleaved: every good one is answered and debited once;
    each bad one gets its own status_code 3 answer; the stream ends OK."""
    await fund_over_grpc(running.admin, ACCOUNT, 1 * USD)
    good = [authorize_request(ACCOUNT, 1_000, rid()) for _ in range(40)]
    bad = [raw for raw, _ in CORRUPT.values()]
    sent: list[bytes] = []
    for index, request in enumerate(good):
        sent.append(request.SerializeToString())
        sent.append(bad[index % len(bad)])

    async def feed() -> AsyncIterator[bytes]:
        for message in sent:
            yield message

    stream = running.gate_channel.stream_stream(
        f"{SERVICE}/AuthorizeStream",
        request_serializer=None,
        response_deserializer=gate_pb2.AuthorizeResponse.FromString,
    )
    call = stream(feed())
    answers: list[gate_pb2.AuthorizeResponse] = [answer async for answer in call]
    assert await call.code() == grpc.StatusCode.OK

    answered = {a.request_id: a for a in answers if a.status_code == 0}
    assert set(answered) == {r.request_id for r in good}
    assert all(a.allowed for a in answered.values())
    refused = [a for a in answers if a.status_code != 0]
    assert len(refused) == len(good)  # one answer per bad message
    assert {a.status_code for a in refused} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    assert not any(a.allowed for a in refused)
    for answer in refused:
        _no_python_in(answer.status_message)
    account = await running.admin.GetAccount(admin_pb2.GetAccountRequest(account_id=ACCOUNT))
    assert account.balance_micros == USD - 1_000 * len(good)


async def test_issue_12_item_9_stream_echoes_a_readable_request_id(running: RunningGate) -> None:
    """A message whose request_id is readable (another field is not UTF-8) is answered with
    that request_id, so the client can match the failure to its caller."""
    raw = b"\x0a\x02\xff\xfe\x12\x06req-42\x18\x01"

    async def feed() -> AsyncIterator[bytes]:
        yield raw

    stream = running.gate_channel.stream_stream(
        f"{SERVICE}/AuthorizeStream",
        request_serializer=None,
        response_deserializer=gate_pb2.AuthorizeResponse.FromString,
    )
    answers = [answer async for answer in stream(feed())]
    assert len(answers) == 1
    assert answers[0].request_id == "req-42"
    assert answers[0].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "account_id" in answers[0].status_message


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/balance_gate.v1.Admin/GetAccount", "account_id"),
        ("/envoy.service.auth.v3.Authorization/Check", "request"),
    ],
)
async def test_issue_12_item_9_other_services_refuse_corrupt_messages_too(
    running: RunningGate, path: str, named: str
) -> None:
    """The admin port and Envoy's Check are registered the same way: no UNKNOWN there either."""
    channel = running.admin_channel if "Admin" in path else running.gate_channel
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
            b"\x0a\x02\xff\xfe"
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert (raised.value.details() or "").startswith(f"{named}:")
    _no_python_in(raised.value.details() or "")


CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
VALID = authorize_request("fuzzed-account", 1_000, "fuzzed-request", "cap").SerializeToString()


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid message with a byte changed, cut short or extended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    raw = bytearray(VALID)
    at = draw(st.integers(0, len(raw) - 1))
    how = draw(st.sampled_from(["flip", "cut", "append"]))
    if how == "flip":
        raw[at] = draw(st.integers(0, 255))
    elif how == "cut":
        del raw[at:]
    else:
        raw += draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


@pytest.mark.parametrize("method", ["Authorize", "Settle"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=raw_messages())
async def test_issue_12_item_9_raw_bytes_never_get_unknown(
    running: RunningGate, method: str, raw: bytes
) -> None:
    """Hypothesis: whatever bytes arrive, the answer is OK or a clean refusal."""
    code, details = grpc.StatusCode.OK, ""
    try:
        await _raw_unary(running, method)(raw)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    assert code in CLEAN, (raw, code, details)
    _no_python_in(details)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raws=st.lists(raw_messages(), min_size=1, max_size=8))
async def test_issue_12_item_9_raw_bytes_on_a_stream_each_get_an_answer(
    running: RunningGate, raws: list[bytes]
) -> None:
    """Hypothesis: a stream of arbitrary messages gets one answer per message and ends OK."""

    async def feed() -> AsyncIterator[bytes]:
        for raw in raws:
            yield raw

    stream = running.gate_channel.stream_stream(
        f"{SERVICE}/AuthorizeStream",
        request_serializer=None,
        response_deserializer=gate_pb2.AuthorizeResponse.FromString,
    )
    call = stream(feed())
    answers = [answer async for answer in call]
    assert await call.code() == grpc.StatusCode.OK
    assert len(answers) == len(raws)
    for answer in answers:
        assert answer.status_code in {code.value[0] for code in CLEAN}, answer
