"""Hypothesis: malformed and extreme input to every RPC gets a clean answer.

The RPCs are read from the descriptors of the generated modules, so a new RPC
(or a new field) is covered without touching this file. Every field of every
request may be missing, huge, in any unicode category protobuf can carry,
full of control characters, or at the edge of its integer type; nested
messages, repeated and map fields are generated the same way. Half of the
examples set every field to a plausible value instead, to reach the core.

Each answer must be OK or a clean refusal (never INTERNAL or UNKNOWN); the
sidecar must keep serving; and the pre-funded accounts must not move. Their ids
contain a character the generator never produces, so no generated call can
name them, even the ones that legitimately move money (Credit, TopUp...).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from balance_gate.v1 import admin_pb2, gate_pb2
from tests.conftest import RunningGate
from tests.helpers import USD, fund

CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CLEAN_CODES = {code.value[0] for code in CLEAN}

# Funded ids carry U+2042 (ASTERISM); generated text never does.
UNNAMEABLE = "\u2042"
FUNDED = {f"funded{UNNAMEABLE}{n}": (n + 1) * USD for n in range(3)}
# An account the generator may name, so valid-looking calls reach deep paths.
TARGET = "fuzz-target"


def _all_methods(*modules: ModuleType) -> Iterator[MethodDescriptor]:
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


METHODS = {f"{m.containing_service.name}/{m.name}": m for m in _all_methods(gate_pb2, admin_pb2)}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
}
_EDGES = (0, 1, -1, 2, 100, 2**31 - 1, 2**32, 2**53 - 1, 2**53, 2**53 + 1, 10**12, 10**14 + 1)


def _integers(lower: int, upper: int) -> st.SearchStrategy[int]:
    edges = {lower, upper, lower + 1, upper - 1} | {e for e in _EDGES if lower <= e <= upper}
    edges |= {-e for e in _EDGES if lower <= -e <= upper}
    return st.one_of(st.sampled_from(sorted(edges)), st.integers(lower, upper))


# Any code point UTF-8 can carry (protobuf strings refuse lone surrogates), controls included.
_any_char = st.characters(codec="utf-8", exclude_characters=UNNAMEABLE)
_odd_char = st.characters(
    codec="utf-8", categories=["Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "So"]
)
# Values a field might expect, so that calls get past the first check.
_PLAUSIBLE = (
    TARGET, "", " ", "USD", "usd", "EUR", "XXX", "2026-11", "2026-13", "2026-11-25",
    "9999-12-31", "1.25", "-1", "NaN", "1e309", "Europe/Paris", "Mars/Olympus",
    "pm_card_visa", "pm_card_chargeDeclined", "a@b.c", "not-an-email", "approve",
    "reject", "open", "cut",
)  # fmt: skip
_huge = st.builds(
    lambda char, size: char * size,
    st.sampled_from(["a", "é", "€", "😀", "\x00", "\u200b", "\U0010ffff"]),
    st.sampled_from([64, 65, 128, 129, 500, 501, 4_096, 20_000, 70_000]),
)
_text = st.one_of(
    st.sampled_from(_PLAUSIBLE),
    st.text(_any_char, max_size=40),
    st.text(_odd_char, min_size=1, max_size=12),
    st.builds(lambda a, b: a + b, st.sampled_from(_PLAUSIBLE), st.text(_odd_char, max_size=3)),
    _huge,
)


# The plausible half: every field set to a value a caller might really send, so that
# calls get past the first check and into the core (Credit, TopUp, SetCreditLine...).
_plausible_text = st.one_of(
    st.just(TARGET),  # often: the one account that exists
    st.sampled_from(_PLAUSIBLE),
    st.text("abcxyz-_.0189", min_size=1, max_size=12),
)
_PLAUSIBLE_INTS = (0, 1, 2, 7, 30, 100, 365, 10_000, 1_000_000, 5_000_000, 25_000_000)


def _scalar(field: FieldDescriptor, depth: int, plausible: bool) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        lower, upper = _INT_RANGES[kind]
        if plausible:
            return st.sampled_from([n for n in _PLAUSIBLE_INTS if lower <= n <= upper])
        return _integers(lower, upper)
    if kind == FieldDescriptor.TYPE_STRING:
        return _plausible_text if plausible else _text
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = st.sampled_from([value.number for value in field.enum_type.values])
        return numbers if plausible else st.one_of(numbers, _integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        return _messages(field.message_type, depth + 1, plausible)
    raise AssertionError(f"no strategy for {field.full_name} (type {kind})")


def _field(field: FieldDescriptor, depth: int, plausible: bool) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name
        return st.dictionaries(
            _scalar(entry["key"], depth, plausible),
            _scalar(entry["value"], depth, plausible),
            max_size=4,
        )
    if field.is_repeated:
        return st.lists(_scalar(field, depth, plausible), max_size=4)
    return _scalar(field, depth, plausible)


def _messages(descriptor: Descriptor, depth: int, plausible: bool) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields = {f.name: _field(f, depth, plausible) for f in descriptor.fields}
    # Hostile: any subset of the fields. Plausible: all of them.
    values = (
        st.fixed_dictionaries(fields) if plausible else st.fixed_dictionaries({}, optional=fields)
    )
    return st.builds(lambda kwargs: cls(**kwargs), values)


def messages(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`: hostile values in any subset of fields, or plausible ones."""
    return st.one_of(_messages(descriptor, 0, False), _messages(descriptor, 0, True))


async def _call(channel: grpc.aio.Channel, method: MethodDescriptor, draw: Any) -> None:
    """One call with generated input; every answer must be clean."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    output = message_factory.GetMessageClass(method.output_type)
    serialize, parse = (lambda m: m.SerializeToString()), output.FromString
    answers: list[Any] = []
    code, details = grpc.StatusCode.OK, ""
    if method.client_streaming:
        request: Any = draw(st.lists(messages(method.input_type), min_size=1, max_size=5))
        stream = channel.stream_stream(
            path, request_serializer=serialize, response_deserializer=parse
        )
        try:
            answers = [a async for a in stream(iter(request), timeout=30)]
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
    else:
        request = draw(messages(method.input_type))
        unary = channel.unary_unary(path, request_serializer=serialize, response_deserializer=parse)
        try:
            await unary(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
    event(code.name)  # --hypothesis-show-statistics: how deep the examples reached
    assert code in CLEAN, (method.name, code, details)
    for answer in answers:  # AuthorizeStream: a failed request is its own answer
        assert answer.status_code in CLEAN_CODES, (method.name, answer)


async def _funded_balances(running: RunningGate) -> dict[str, tuple[int, int, int]]:
    views = {a: await running.app.accounts.get(a) for a in FUNDED}
    return {a: (v.balance_micros, v.credited_micros, v.used_micros) for a, v in views.items()}


@pytest.fixture
async def fuzzed(running: RunningGate) -> RunningGate:
    for account_id, micros in FUNDED.items():
        await fund(running.app, account_id, micros)
    await running.app.accounts.create(TARGET, "USD")
    return running


def test_every_rpc_is_fuzzed() -> None:
    """The list comes from the descriptors: both services, AuthorizeStream included."""
    gate = {"BalanceGate/Authorize", "BalanceGate/AuthorizeStream", "BalanceGate/Settle"}
    assert gate <= set(METHODS)
    assert sum(name.startswith("Admin/") for name in METHODS) >= 20


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_hostile_input_gets_a_clean_answer_and_moves_no_money(
    fuzzed: RunningGate, name: str, data: st.DataObject
) -> None:
    method = METHODS[name]
    gate = method.containing_service.name == "BalanceGate"
    channel = fuzzed.gate_channel if gate else fuzzed.admin_channel
    await _call(channel, method, data.draw)

    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    # Funded once, then never named: balance = credited, nothing used.
    assert await _funded_balances(fuzzed) == {a: (m, m, 0) for a, m in FUNDED.items()}
