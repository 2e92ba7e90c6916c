"""The load generator every benchmark shares: gate and no-op alike.

Worker processes (one event loop each, uvloop when installed) drive
`BalanceGate/Authorize` (unary) or `BalanceGate/AuthorizeStream`
(bidirectional) on 127.0.0.1. Every call carries a distinct request id, so
the gate always debits and never answers from its replay path.

Closed loop (`--concurrency`): each worker keeps that many calls in flight.
Open loop (`--rate`): calls start on a fixed schedule whatever the answers
do, and latency counts from the scheduled start (no coordinated omission).

Prints one JSON object: calls, allowed, denied, errors, throughput,
latency percentiles in microseconds and the workers' own CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from array import array
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from balance_gate.v1 import gate_pb2

UNARY = "/balance_gate.v1.BalanceGate/Authorize"
STREAM = "/balance_gate.v1.BalanceGate/AuthorizeStream"
_serialize = gate_pb2.AuthorizeRequest.SerializeToString
_parse = gate_pb2.AuthorizeResponse.FromString


@dataclass
class Plan:
    target: str
    mode: str  # "unary" | "stream"
    duration_s: float
    warmup_s: float
    concurrency: int  # in flight per worker (closed loop); per stream for "stream"
    rate: float  # calls/s per worker; 0 = closed loop
    channels: int  # connections per worker
    streams: int  # streams per channel ("stream" mode)
    accounts: int
    amount_micros: int
    run_id: str


@dataclass
class Tally:
    calls: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    late: int = 0  # open loop: calls not started because too many were in flight
    answered_all: int = 0  # answers including the warm-up's (for CPU per call)
    latencies_us: array[float] = field(default_factory=lambda: array("d"))

    def answer(self, response: gate_pb2.AuthorizeResponse, started: float) -> None:
        self.calls += 1
        if response.allowed:
            self.allowed += 1
        else:
            self.denied += 1
        self.latencies_us.append((time.perf_counter() - started) * 1e6)


def _channel(target: str, index: int) -> grpc.aio.Channel:
    # A local subchannel pool gives every channel its own TCP connection, so
    # SO_REUSEPORT can spread them over the server's processes.
    options = [("grpc.use_local_subchannel_pool", 1), ("bench.channel", index)]
    return grpc.aio.insecure_channel(target, options=options)


class Worker:
    def __init__(self, plan: Plan, worker: int) -> None:
        self.plan = plan
        self.worker = worker
        self.sequence = 0
        self.tally = Tally()
        self.measuring = False
        self.stop_at = 0.0

    def request(self) -> gate_pb2.AuthorizeRequest:
        self.sequence += 1
        n = self.sequence
        return gate_pb2.AuthorizeRequest(
            account_id=f"bench-{(n * 7919 + self.worker) % self.plan.accounts}",
            request_id=f"{self.plan.run_id}-{self.worker}-{n}",
            amount_micros=self.plan.amount_micros,
        )

    def record(self, response: gate_pb2.AuthorizeResponse, started: float) -> None:
        self.tally.answered_all += 1
        if self.measuring:
            self.tally.answer(response, started)

    def failed(self) -> None:
        if self.measuring:
            self.tally.errors += 1

    async def run(self) -> Tally:
        plan = self.plan
        channels = [_channel(plan.target, i) for i in range(plan.channels)]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        begin = time.perf_counter()
        self.stop_at = begin + plan.warmup_s + plan.duration_s
        loops = self._loops(channels)
        tasks = [asyncio.create_task(loop) for loop in loops]
        await asyncio.sleep(plan.warmup_s)
        self.measuring = True
        cpu_before = _cpu_seconds()
        await asyncio.gather(*tasks)
        self.measuring = False
        self.tally_cpu = _cpu_seconds() - cpu_before
        for channel in channels:
            await channel.close(None)
        return self.tally

    def _loops(self, channels: list[grpc.aio.Channel]) -> list[Coroutine[Any, Any, None]]:
        plan = self.plan
        if plan.mode == "stream":
            return [self._stream(channel) for channel in channels for _ in range(plan.streams)]
        calls = [
            channel.unary_unary(UNARY, request_serializer=_serialize, response_deserializer=_parse)
            for channel in channels
        ]
        if plan.rate > 0:
            return [self._open_loop(calls)]
        return [self._closed_loop(calls[i % len(calls)]) for i in range(plan.concurrency)]

    async def _closed_loop(self, call: Callable[..., Any]) -> None:
        while time.perf_counter() < self.stop_at:
            started = time.perf_counter()
            try:
                response = await call(self.request(), timeout=2)
            except grpc.aio.AioRpcError:
                self.failed()
                continue
            self.record(response, started)

    async def _open_loop(self, calls: Sequence[Callable[..., Any]]) -> None:
        interval = 1.0 / self.plan.rate
        in_flight: set[asyncio.Task[None]] = set()
        limit = max(64, int(self.plan.rate))  # a second's worth, then we count "late"
        next_start = time.perf_counter()
        n = 0
        while next_start < self.stop_at:
            now = time.perf_counter()
            while next_start <= now:
                if len(in_flight) < limit:
                    task = asyncio.create_task(self._timed(calls[n % len(calls)], next_start))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    n += 1
                elif self.measuring:
                    self.tally.late += 1
                next_start += interval
            # Wake at most every millisecond and start what is due in one go:
            # waking per call cost the generator more CPU than the calls.
            await asyncio.sleep(max(0.001, next_start - time.perf_counter()))
        if in_flight:
            await asyncio.gather(*in_flight)

    async def _timed(self, call: Callable[..., Any], scheduled: float) -> None:
        try:
            response = await call(self.request(), timeout=2)
        except grpc.aio.AioRpcError:
            self.failed()
            return
        self.record(response, scheduled)

    async def _stream(self, channel: grpc.aio.Channel) -> None:
        """One stream with `concurrency` requests in flight; answers match by request_id."""
        call = channel.stream_stream(
            STREAM, request_serializer=_serialize, response_deserializer=_parse
        )()  # type: ignore[call-arg]  # grpc.aio: no iterator means write() by hand
        pending: dict[str, float] = {}
        window = asyncio.Semaphore(self.plan.concurrency)

        async def send() -> None:
            while time.perf_counter() < self.stop_at:
                await window.acquire()
                request = self.request()
                pending[request.request_id] = time.perf_counter()
                await call.write(request)
            await call.done_writing()

        sender = asyncio.create_task(send())
        try:
            async for response in call:
                started = pending.pop(response.request_id, None)
                window.release()
                if started is None:
                    self.failed()
                else:
                    self.record(response, started)
        except grpc.aio.AioRpcError:
            self.failed()
        await sender


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_loop(main: Coroutine[Any, Any, Tally]) -> Tally:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _worker_main(plan: Plan, index: int, out: Connection) -> None:
    worker = Worker(plan, index)
    tally = _run_loop(worker.run())
    out.send_bytes(
        json.dumps(
            {
                "calls": tally.calls,
                "allowed": tally.allowed,
                "denied": tally.denied,
                "errors": tally.errors,
                "late": tally.late,
                "answered_all": tally.answered_all,
                "cpu_s": worker.tally_cpu,
            }
        ).encode()
    )
    out.send_bytes(tally.latencies_us.tobytes())
    out.close()


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def run(plan: Plan, processes: int) -> dict[str, Any]:
    """Run the plan on `processes` workers and merge what they measured."""
    context = mp.get_context("spawn")
    pipes = []
    workers = []
    for index in range(processes):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_worker_main, args=(plan, index, send), daemon=True)
        process.start()
        send.close()
        pipes.append(receive)
        workers.append(process)
    totals = {
        "calls": 0,
        "allowed": 0,
        "denied": 0,
        "errors": 0,
        "late": 0,
        "answered_all": 0,
        "cpu_s": 0.0,
    }
    latencies = array("d")
    for receive in pipes:
        part = json.loads(receive.recv_bytes())
        for key in totals:
            totals[key] += part[key]
        latencies.frombytes(receive.recv_bytes())
    for process in workers:
        process.join(timeout=30)
    ordered = sorted(latencies)
    return {
        **totals,
        "mode": plan.mode,
        "processes": processes,
        "plan": asdict(plan),
        "throughput": totals["calls"] / plan.duration_s,
        "generator_cpu_per_s": totals["cpu_s"] / plan.duration_s,
        "p50_us": percentile(ordered, 0.50),
        "p99_us": percentile(ordered, 0.99),
        "p999_us": percentile(ordered, 0.999),
    }


def parse_args(argv: list[str]) -> tuple[Plan, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port of BalanceGate")
    parser.add_argument("--mode", choices=["unary", "stream"], default="unary")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=32, help="in flight per worker/stream")
    parser.add_argument("--rate", type=float, default=0.0, help="total calls/s (open loop)")
    parser.add_argument("--channels", type=int, default=2, help="connections per worker")
    parser.add_argument("--streams", type=int, default=1, help="streams per connection")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--amount-micros", type=int, default=1)
    parser.add_argument("--run-id", default=f"r{os.getpid()}-{int(time.time())}")
    args = parser.parse_args(argv)
    plan = Plan(
        target=args.target,
        mode=args.mode,
        duration_s=args.duration,
        warmup_s=args.warmup,
        concurrency=args.concurrency,
        rate=args.rate / args.processes,
        channels=args.channels,
        streams=args.streams,
        accounts=args.accounts,
        amount_micros=args.amount_micros,
        run_id=args.run_id,
    )
    return plan, args.processes


if __name__ == "__main__":
    chosen_plan, process_count = parse_args(sys.argv[1:])
    print(json.dumps(run(chosen_plan, process_count)))
