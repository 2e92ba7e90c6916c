"""An asyncio client of the gate for proxies written in Python.

    async with GateClient("127.0.0.1:50051", fail_mode="fail_closed") as gate:
        decision = await gate.authorize("acme-42", "req-1", 10_000, capability="gpt-4o")
        if decision.allowed:
            ...
        await gate.settle("acme-42", "req-1", 7_500)

One grpc.aio channel is opened when the client is built and closed by `close()`.
Concurrent `authorize` calls share one long-lived AuthorizeStream: a background
task writes the requests and hands each answer (matched by its echoed
request_id) to the callers waiting for it. When the stream breaks, the callers
whose requests were on it get the fail-mode answer, and the next request opens
a new stream.

The fail mode is the client's own answer when the gate did not decide: the
sidecar cannot be reached, the deadline passed, or the gate answered
UNAVAILABLE. `fail_closed` denies with code `unavailable`; `fail_open` allows
with `decided=False`, and nothing is debited for that request anywhere: the
proxy lets it through for free. The gate's own BALANCE_GATE_REDIS_FAIL_MODE
applies first, when the sidecar is up and Redis is not; its answers are
`decided=True` (README, "The client").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import grpc

from balance_gate.v1 import gate_pb2, gate_pb2_grpc

log = logging.getLogger(__name__)

FailMode = Literal["fail_closed", "fail_open"]
FAIL_MODES: tuple[FailMode, ...] = ("fail_closed", "fail_open")

DEADLINE_S_DEFAULT = 1.0
# Requests one client holds waiting for an answer; beyond, the fail mode answers.
PENDING_MAX = 100_000
# After a stream that broke without answering anything, the fail mode answers
# for this long before a new stream is tried (doubling up to the maximum).
REOPEN_BACKOFF_S_MIN = 0.05
REOPEN_BACKOFF_S_MAX = 1.0

# Long-lived channels: ping an idle connection so a dead peer or a NAT that
# dropped it is noticed (the server accepts a ping every 10 s: server.py).
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

# The gate did not decide: the client's fail mode answers.
_UNDECIDED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


# A stream ended with these is refused as a whole: its callers get the error.
# Any other end of a stream is the sidecar going away: they get the fail mode.
_STREAM_REFUSALS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})


# --- errors -----------------------------------------------------------------


class GateError(Exception):
    """An RPC error of the gate, with its gRPC status and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidRequest(GateError):
    """INVALID_ARGUMENT: the message names the field (`amount_micros: ...`)."""

    @property
    def field(self) -> str:
        name, _, _ = self.message.partition(":")
        return name


class NotFound(GateError):
    """NOT_FOUND: an unknown account, or a request Settle cannot find."""


class AlreadyExists(GateError):
    """ALREADY_EXISTS."""


class Conflict(GateError):
    """FAILED_PRECONDITION: e.g. a request_id reused with another amount."""


class PermissionDenied(GateError):
    """PERMISSION_DENIED: this proxy may not debit the account."""


class Unauthenticated(GateError):
    """UNAUTHENTICATED: the admin API needs a valid bearer token."""


class Unavailable(GateError):
    """UNAVAILABLE or DEADLINE_EXCEEDED: nothing answered in time (Settle, admin calls)."""


_ERRORS: dict[grpc.StatusCode, type[GateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def error_for(code: grpc.StatusCode, message: str) -> GateError:
    """The typed error of a gRPC status (GateError itself for the others)."""
    return _ERRORS.get(code, GateError)(code, message)


def error_of(exc: grpc.aio.AioRpcError) -> GateError:
    return error_for(exc.code(), exc.details() or "")


# --- the connection ---------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """Where and how to connect: TLS files (PEM) and an admin bearer token.

    No `ca_file`: plaintext. `cert_file` and `key_file` (both or neither) add a
    client certificate (mutual TLS). The token is sent as
    `authorization: Bearer <token>` (the admin API; the gate port ignores it).
    """

    target: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token: str = ""
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file: set both (mutual TLS) or neither")
        if self.cert_file and not self.ca_file:
            raise ValueError("cert_file needs ca_file (TLS)")

    def __repr__(self) -> str:  # never the token
        token = ", token=<hidden>" if self.token else ""
        return f"Connection(target={self.target!r}, tls={bool(self.ca_file)}{token})"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def channel(self, options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
        opts: list[tuple[str, int | str]] = [*KEEPALIVE_OPTIONS, *options]
        if not self.ca_file:
            return grpc.aio.insecure_channel(self.target, options=opts)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes() if self.key_file else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
        )
        return grpc.aio.secure_channel(self.target, credentials, options=opts)


# --- results ----------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One Authorize answer.

    `decided` is False when the gate did not decide and the client's fail mode
    answered: then `allowed` is the fail mode (False, code `unavailable`, under
    fail_closed; True under fail_open, with nothing debited), `balance_micros` is
    0 and `detail` says why.
    """

    allowed: bool
    code: str
    balance_micros: int
    replayed: bool
    request_id: str
    decided: bool = True
    detail: str = ""
    # Allowed, but under the warning level with no top-up coming: warn the user.
    low_balance: bool = False
    # Shadow mode: the gate would have denied this (`code` says why) and allowed it.
    shadow: bool = False

    @property
    def failed_open(self) -> bool:
        """Allowed by the client's fail_open without the gate: nothing was debited."""
        return self.allowed and not self.decided


@dataclass(frozen=True)
class Settlement:
    balance_micros: int
    delta_micros: int
    replayed: bool


@dataclass(frozen=True)
class _Failure:
    """The stream broke (or the gate answered a status) before this request's answer."""

    code: grpc.StatusCode
    message: str


_Outcome = gate_pb2.AuthorizeResponse | _Failure


@dataclass
class _Pending:
    request: gate_pb2.AuthorizeRequest
    future: asyncio.Future[_Outcome]
    waiters: int = 0
    sent: bool = False


# --- the client -------------------------------------------------------------


class GateClient:
    """The gate's client for one proxy process: one channel, one AuthorizeStream."""

    def __init__(
        self,
        target: str | Connection,
        *,
        fail_mode: FailMode = "fail_closed",
        deadline_s: float = DEADLINE_S_DEFAULT,
        pending_max: int = PENDING_MAX,
        channel_options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode: expected one of {FAIL_MODES}, got {fail_mode!r}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s: expected > 0, got {deadline_s}")
        if pending_max < 1:
            raise ValueError(f"pending_max: expected >= 1, got {pending_max}")
        self.connection = target if isinstance(target, Connection) else Connection(target)
        self.fail_mode: FailMode = fail_mode
        self.deadline_s = deadline_s
        self._pending_max = pending_max
        self._channel = self.connection.channel(channel_options)
        self._stub = gate_pb2_grpc.BalanceGateStub(self._channel)
        self._pending: dict[str, _Pending] = {}
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        # After a stream that answered nothing, the fail mode answers at once until then.
        self._down_until = 0.0
        self._down_reason = ""
        # Streams opened so far (a test and a log line watch reopenings).
        self.streams_opened = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the stream; callers still waiting get the fail mode. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self._fail_pending(_Failure(grpc.StatusCode.UNAVAILABLE, "client closed"), sent_only=False)
        await self._channel.close(None)

    # --- Authorize over the stream ---

    async def authorize(
        self,
        account_id: str,
        request_id: str,
        amount_micros: int,
        capability: str = "",
        *,
        deadline_s: float | None = None,
    ) -> Decision:
        """Decide one request over the shared stream.

        Raises InvalidRequest, Conflict (same request_id, other amount), or
        PermissionDenied; a gate that did not decide in time gets the fail mode.
        """
        if self._closed:
            raise RuntimeError("GateClient is closed")
        request = gate_pb2.AuthorizeRequest(
            account_id=account_id,
            request_id=request_id,
            amount_micros=amount_micros,
            capability=capability,
        )
        entry = self._pending.get(request_id)
        if entry is None:
            if time.monotonic() < self._down_until:
                return self._fail_mode(request_id, self._down_reason)
            if len(self._pending) >= self._pending_max:
                return self._fail_mode(request_id, "too many requests waiting in the client")
            entry = _Pending(request, asyncio.get_running_loop().create_future())
            self._pending[request_id] = entry
            self._queue.put_nowait(entry)
            self._start_pump()
        elif entry.request != request:
            # The stream matches answers by request_id alone: one at a time.
            raise Conflict(
                grpc.StatusCode.FAILED_PRECONDITION,
                "request_id: already in flight on this client with another account_id,"
                " amount_micros or capability",
            )
        entry.waiters += 1
        try:
            outcome = await asyncio.wait_for(
                asyncio.shield(entry.future), self._deadline(deadline_s)
            )
        except TimeoutError:
            return self._fail_mode(request_id, "deadline exceeded")
        finally:
            entry.waiters -= 1
            if entry.waiters == 0 and not entry.future.done():
                # Nobody waits any more: do not send it, or forget its answer.
                entry.future.cancel()
                if self._pending.get(request_id) is entry:
                    del self._pending[request_id]
        return self._decision(request_id, outcome)

    def _decision(self, request_id: str, outcome: _Outcome) -> Decision:
        if isinstance(outcome, _Failure):
            code, message = outcome.code, outcome.message
        elif outcome.status_code:
            code = _CODES_BY_VALUE.get(outcome.status_code, grpc.StatusCode.UNKNOWN)
            message = outcome.status_message
        else:
            return Decision(
                allowed=outcome.allowed,
                code=outcome.code,
                balance_micros=outcome.balance_micros,
                replayed=outcome.replayed,
                request_id=outcome.request_id,
                low_balance=outcome.low_balance,
                shadow=outcome.shadow,
            )
        if code in _UNDECIDED:
            return self._fail_mode(request_id, f"{code.name}: {message}")
        raise error_for(code, message)

    def _fail_mode(self, request_id: str, detail: str) -> Decision:
        allowed = self.fail_mode == "fail_open"
        return Decision(
            allowed=allowed,
            code="" if allowed else "unavailable",
            balance_micros=0,
            replayed=False,
            request_id=request_id,
            decided=False,
            detail=detail,
        )

    def _deadline(self, deadline_s: float | None) -> float:
        chosen = self.deadline_s if deadline_s is None else deadline_s
        if not chosen > 0:
            raise ValueError(f"deadline_s: expected > 0, got {chosen}")
        return chosen

    def _start_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_streams(), name="balance-gate-stream")

    async def _run_streams(self) -> None:
        """Open a stream when there is work; reopen it after it breaks."""
        backoff_s = REOPEN_BACKOFF_S_MIN
        while True:
            first = await self._queue.get()
            if first.future.done():
                continue
            answered, failure = await self._one_stream(first)
            if answered:
                backoff_s = REOPEN_BACKOFF_S_MIN
                continue
            # Nothing answered: the sidecar is down. Every waiting caller gets the
            # fail mode now, and so does every new one for backoff_s, instead of
            # each of them waiting out its deadline.
            self._fail_pending(failure, sent_only=False)
            self._down_until = time.monotonic() + backoff_s
            self._down_reason = f"{failure.code.name}: {failure.message}"
            backoff_s = min(backoff_s * 2, REOPEN_BACKOFF_S_MAX)

    async def _one_stream(self, first: _Pending) -> tuple[bool, _Failure]:
        """Serve one AuthorizeStream until it breaks: whether it answered, and why it ended."""
        # grpc.aio: no request iterator means write() by hand.
        call = self._stub.AuthorizeStream(metadata=self.connection.metadata)  # type: ignore[call-arg]
        self.streams_opened += 1
        answered = False

        async def write() -> None:
            entry = first
            while True:
                if not entry.future.done():
                    entry.sent = True
                    await call.write(entry.request)
                entry = await self._queue.get()

        async def read() -> None:
            nonlocal answered
            async for response in call:
                answered = True
                entry = self._pending.get(response.request_id)
                # Not sent yet: a caller that gave up left this answer behind, and
                # this entry (the same id, asked again) waits for its own.
                if entry is not None and entry.sent:
                    del self._pending[response.request_id]
                    if not entry.future.done():
                        entry.future.set_result(response)

        writer = asyncio.create_task(write())
        reader = asyncio.create_task(read())
        failure = _Failure(grpc.StatusCode.UNAVAILABLE, "the stream ended")
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    failure = _Failure(grpc.StatusCode.UNAVAILABLE, f"stream failed: {exc!r}")
            if call.done():  # the call's own status beats a write's "Internal error from Core"
                code, details = await call.code(), await call.details()
                failure = _Failure(
                    code if code in _STREAM_REFUSALS else grpc.StatusCode.UNAVAILABLE,
                    f"{code.name}: {details}",
                )
            log.warning("AuthorizeStream to %s broke: %s", self.connection.target, failure)
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            call.cancel()
            # UNAVAILABLE: the fail mode answers these callers; a stream refused
            # as a whole (PERMISSION_DENIED) is that error for each of them.
            self._fail_pending(failure, sent_only=True)
        return answered, failure

    def _fail_pending(self, failure: _Failure, *, sent_only: bool) -> None:
        for request_id, entry in list(self._pending.items()):
            if sent_only and not entry.sent:
                continue
            del self._pending[request_id]
            if not entry.future.done():
                entry.future.set_result(failure)

    # --- Settle ---

    async def settle(
        self,
        account_id: str,
        request_id: str,
        amount_micros: int,
        *,
        deadline_s: float | None = None,
    ) -> Settlement:
        """Record a request's final cost (a unary call; retry it with the same amount).

        Raises the typed errors, Unavailable included: Settle has no fail mode.
        """
        try:
            answer = await self._stub.Settle(
                gate_pb2.SettleRequest(
                    account_id=account_id, request_id=request_id, amount_micros=amount_micros
                ),
                timeout=self._deadline(deadline_s),
                metadata=self.connection.metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_of(exc) from None
        return Settlement(answer.balance_micros, answer.delta_micros, answer.replayed)
