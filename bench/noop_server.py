"""The limit we compare against: BalanceGate answered without doing anything.

Same grpc.aio server options (balance_gate.server.grpc_server), same event
loop (uvloop), same worker model (balance_gate.workers) and the same message
shapes as the sidecar; the handlers answer "allowed" at once.

    python bench/noop_server.py --listen 127.0.0.1:50061 [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop

from balance_gate.server import ServerLimits, grpc_server
from balance_gate.settings import Settings
from balance_gate.v1 import gate_pb2, gate_pb2_grpc
from balance_gate.workers import supervise

Context = grpc.aio.ServicerContext[Any, Any]


class NoopGate(gate_pb2_grpc.BalanceGateServicer):
    async def Authorize(
        self, request: gate_pb2.AuthorizeRequest, context: Context
    ) -> gate_pb2.AuthorizeResponse:
        return gate_pb2.AuthorizeResponse(
            allowed=True, balance_micros=1_000_000, request_id=request.request_id
        )

    async def Settle(
        self, request: gate_pb2.SettleRequest, context: Context
    ) -> gate_pb2.SettleResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the no-op server only authorizes")
        raise AssertionError("abort() returned")

    async def AuthorizeStream(
        self, request_iterator: AsyncIterator[gate_pb2.AuthorizeRequest], context: Context
    ) -> AsyncIterator[gate_pb2.AuthorizeResponse]:
        async for request in request_iterator:
            yield gate_pb2.AuthorizeResponse(
                allowed=True, balance_micros=1_000_000, request_id=request.request_id
            )


async def serve(listen: str, reuse_port: bool) -> None:
    server = grpc_server(reuse_port=reuse_port, limits=ServerLimits.gate(Settings()))
    gate_pb2_grpc.add_BalanceGateServicer_to_server(NoopGate(), server)
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(1)


def _worker(listen: str, reuse_port: bool, _index: int) -> None:
    uvloop.run(serve(listen, reuse_port))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.workers == 1:
        _worker(args.listen, False, 0)
        return 0
    return supervise(functools.partial(_worker, args.listen, True), args.workers)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
