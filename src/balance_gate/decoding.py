"""Request messages that do not parse are ours to answer, not grpc's.

grpc answers a request its deserializer cannot parse with UNKNOWN and the
DecodeError text, and on a request stream it ends the whole stream, losing the
answers of every other request on it (issue 12 item 9). `add_servicer`
registers a servicer as the generated add_*_to_server does, but each method's
deserializer never raises: a message that does not parse arrives as a
`Malformed` naming what was wrong. A unary method answers it INVALID_ARGUMENT
without running; a request stream hands it to the servicer, which answers it
as one request of the stream (grpc_api.BalanceGateServicer.AuthorizeStream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import DecodeError, Message

from balance_gate import errors, metrics

_MAX_VARINT_BYTES = 10


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse."""

    field: str  # the field at fault, or "request" when the wire format itself is broken
    problem: str
    request_id: str = ""  # when it could be read: the answer echoes it for matching

    def error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument(self.field, self.problem)


class _Corrupt(Exception):
    """The wire format is broken; the message says how and where."""


def parse(message_class: type[Message], raw: bytes) -> Message | Malformed:
    """The message, or what is wrong with it; never raises."""
    try:
        return message_class.FromString(raw)
    except DecodeError:
        return diagnose(cast(Descriptor, message_class.DESCRIPTOR), raw)


def diagnose(descriptor: Descriptor, raw: bytes) -> Malformed:
    """Why `raw` is not a `descriptor` message: a walk of its top-level fields.

    protobuf's own error says only "wire format was corrupt" or "bad UTF-8";
    this names the byte or the string field.
    """
    strings = {f.number: f.name for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING}
    not_utf8: str | None = None
    request_id = ""
    try:
        for number, value in _fields(raw):
            name = strings.get(number)
            if name is None or value is None:
                continue
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                not_utf8 = not_utf8 or name
                text = ""
            if name == "request_id":
                request_id = text
    except _Corrupt as exc:
        return Malformed("request", f"is not a valid {descriptor.full_name}: {exc}", request_id)
    if not_utf8 is not None:
        return Malformed(not_utf8, "is not valid UTF-8", request_id)
    # e.g. a nested message that does not parse
    return Malformed("request", f"is not a valid {descriptor.full_name}", request_id)


def _fields(raw: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, bytes of a length-delimited value or None) for each top-level field."""
    at = 0
    while at < len(raw):
        start = at
        tag, at = _varint(raw, at)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise _Corrupt(f"field number 0 at byte {start}")
        value: bytes | None = None
        if wire_type == 0:
            _, at = _varint(raw, at)
        elif wire_type == 1:
            at += 8
        elif wire_type == 5:
            at += 4
        elif wire_type == 2:
            length, at = _varint(raw, at)
            value, at = raw[at : at + length], at + length
        elif wire_type in (3, 4):  # groups: proto2 only, never in our messages
            raise _Corrupt(f"a group (wire type {wire_type}) at byte {start}")
        else:
            raise _Corrupt(f"invalid wire type {wire_type} at byte {start}")
        if at > len(raw):
            raise _Corrupt(f"field {number} at byte {start} is truncated")
        yield number, value


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and the offset after it."""
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        if at + index >= len(raw):
            raise _Corrupt(f"truncated varint at byte {at}")
        byte = raw[at + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, at + index + 1
    raise _Corrupt(f"a varint longer than {_MAX_VARINT_BYTES} bytes at byte {at}")


Behavior = Callable[..., Any]


def add_servicer(servicer: object, server: grpc.aio.Server, service: ServiceDescriptor) -> None:
    """Register `servicer`'s methods of `service` with deserializers that never raise.

    The same handlers the generated add_*_to_server registers (generic and
    registered), built from the descriptors; the generated stubs stay untouched.
    """
    handlers = {method.name: _handler(servicer, method) for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # grpc-stubs predates registered methods (grpc >= 1.62), which skip generic matching.
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]


def _handler(servicer: object, method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
    request_class = message_factory.GetMessageClass(method.input_type)
    serialize = message_factory.GetMessageClass(method.output_type).SerializeToString

    def deserialize(raw: bytes) -> Message | Malformed:
        return parse(request_class, raw)

    behavior: Behavior = getattr(servicer, method.name)
    if method.client_streaming and method.server_streaming:
        # The servicer reads the stream: a Malformed is one request it answers.
        return grpc.stream_stream_rpc_method_handler(
            behavior, request_deserializer=deserialize, response_serializer=serialize
        )
    if not method.client_streaming and not method.server_streaming:
        return grpc.unary_unary_rpc_method_handler(
            _refusing_malformed(method.name, behavior),
            request_deserializer=deserialize,
            response_serializer=serialize,
        )
    raise NotImplementedError(f"{method.full_name}: half-streaming methods are not served here")


def _refusing_malformed(name: str, behavior: Behavior) -> Behavior:
    """`behavior`, answering a request that did not parse INVALID_ARGUMENT without running it."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            metrics.RPC_ERRORS.labels(name, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        return await behavior(request, context)

    return guarded
