"""`--workers N`: N processes serve the same ports, each with its own event loop.

The kernel spreads new connections over the processes (SO_REUSEPORT); one
Python process is bound to one core by its GIL, so this is how the gate uses
more than one. Every worker is a whole sidecar: background work (flusher,
top-ups, emails) is already safe with several sidecars on one Redis.

The parent only supervises: SIGTERM/SIGINT are passed on, and when a worker
dies on its own the others are stopped too and the parent exits non-zero, so
the service manager (systemd, Kubernetes) restarts the whole set.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 60.0


def exit_with_parent(interval_s: float = 1.0) -> None:
    """In a worker: stop (SIGTERM, the graceful way) once the supervisor is gone.

    A supervisor killed with SIGKILL (the OOM killer, a test) cannot stop its
    workers; without this they would go on serving, orphaned, on shared ports.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def supervise(target: Callable[[int], None], count: int) -> int:
    """Run target(index) in `count` spawned processes until they all end."""
    context = mp.get_context("spawn")
    workers: list[BaseProcess] = [
        context.Process(target=target, args=(index,), name=f"worker-{index}")
        for index in range(count)
    ]
    stopping = threading.Event()

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for worker in workers:
            _signal(worker, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        return _wait(workers, stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal(worker: BaseProcess, signum: int) -> None:
    if worker.pid is None or worker.exitcode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, signum)


def _wait(workers: list[BaseProcess], stopping: threading.Event) -> int:
    alive = {worker.sentinel: worker for worker in workers}
    failed = False
    while alive:
        for sentinel in wait(list(alive)):
            worker = alive.pop(sentinel)  # type: ignore[arg-type]
            worker.join()
            if not stopping.is_set():
                log.error("%s exited with %s; stopping the others", worker.name, worker.exitcode)
                failed = True
                stopping.set()
                for other in alive.values():
                    _signal(other, signal.SIGTERM)
    for worker in workers:
        worker.join(_STOP_TIMEOUT_S)
    return 1 if failed else 0
