"""A sidecar as a real process, on fixed ports so that a restart is the same address."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc

from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from tests.helpers import sidecar_env, wait_serving


class SidecarProcess:
    def __init__(self, settings: Settings, log: Path, **extra: str) -> None:
        self.ports = {"gate": free_port(), "admin": free_port(), "metrics": free_port()}
        self._env = sidecar_env(settings, self.ports, **extra)
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.ports['gate']}")
        self.admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.ports['admin']}")

    async def start(self) -> None:
        self.process = self._spawn()
        await wait_serving(self.channel, self.process)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self._log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "balance_gate", "serve"],
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=60)

    async def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
        await self.channel.close(None)
        await self.admin_channel.close(None)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`balance-gate <args>` against the same Redis and Postgres."""
        return subprocess.run(
            [sys.executable, "-m", "balance_gate", *args],
            env=self._env,
            capture_output=True,
            text=True,
            timeout=120,
        )
