"""Load for fault tests: concurrent Authorize loops that remember what the proxy saw."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from balance_gate.v1 import gate_pb2, gate_pb2_grpc
from tests.helpers import rid


@dataclass
class Seen:
    """What the proxies saw: allowed request ids, and calls without an answer."""

    allowed: dict[str, float] = field(default_factory=dict)  # request_id -> monotonic time
    denied: int = 0
    unanswered: list[str] = field(default_factory=list)  # the proxy retries these
    answered_in_deadline: int = 0
    calls: int = 0


class Load:
    def __init__(
        self, channel: grpc.aio.Channel, account_id: str, amount: int, *, workers: int = 8,
        deadline_s: float = 1.0,
    ) -> None:  # fmt: skip
        self._stub = gate_pb2_grpc.BalanceGateStub(channel)
        self._account = account_id
        self._amount = amount
        self._workers = workers
        self._deadline_s = deadline_s
        self.seen = Seen()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self._workers)]

    async def stop(self) -> Seen:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.seen

    async def until_calls(self, n: int, timeout_s: float = 30) -> None:
        """Wait until n more calls were made (load is really flowing)."""
        target = self.seen.calls + n
        deadline = time.monotonic() + timeout_s
        while self.seen.calls < target:
            assert time.monotonic() < deadline, "load did not flow"
            await asyncio.sleep(0.01)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            request_id = rid()
            await self.call(request_id)

    async def call(self, request_id: str) -> bool | None:
        """One Authorize; True/False for an answer, None for none (unavailable)."""
        self.seen.calls += 1
        request = gate_pb2.AuthorizeRequest(
            account_id=self._account, request_id=request_id, amount_micros=self._amount
        )
        try:
            answer = await self._stub.Authorize(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError:
            self.seen.unanswered.append(request_id)
            await asyncio.sleep(0.01)  # the sidecar is down: a proxy backs off a little
            return None
        self.seen.answered_in_deadline += 1
        if answer.allowed:
            self.seen.allowed[request_id] = time.monotonic()
            return True
        self.seen.denied += 1
        return False

    async def retry_unanswered(self) -> None:
        """What a proxy does with calls that got no answer: the same request ids again."""
        pending, self.seen.unanswered = self.seen.unanswered, []
        for request_id in pending:
            assert await self.call(request_id) is not None, "still no answer after recovery"
