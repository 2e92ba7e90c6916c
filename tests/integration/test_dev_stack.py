"""`make run` (balance-gate dev) comes up, its printed grpcurl commands work, and a
restart reuses the data without funding the demo account twice."""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balance_gate.devservers import free_port, port_is_open
from balance_gate.v1 import admin_pb2, admin_pb2_grpc

START_TIMEOUT_S = 90.0


class DevStack:
    def __init__(self, run_dir: Path, redis_port: int, postgres_port: int) -> None:
        self.gate_port, self.admin_port, self.metrics_port = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "BALANCE_GATE_GATE_LISTEN": f"127.0.0.1:{self.gate_port}",
            "BALANCE_GATE_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "BALANCE_GATE_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "balance_gate", "dev", "--run-dir", str(run_dir),
             "--redis-port", str(redis_port), "--postgres-port", str(postgres_port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_ready(self) -> list[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.output.append(line)
            if line == "ready":
                return self.output
        raise AssertionError("dev stack never printed 'ready':\n" + "\n".join(self.output))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        code = self.process.wait()
        self._pump_thread.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


@contextmanager
def dev_stack(run_dir: Path, redis_port: int, postgres_port: int) -> Iterator[DevStack]:
    stack = DevStack(run_dir, redis_port, postgres_port)
    try:
        yield stack
    finally:
        if stack.stop() != 0 or port_is_open(postgres_port) or port_is_open(redis_port):
            _kill_servers(run_dir, redis_port)


def _kill_servers(run_dir: Path, redis_port: int) -> None:
    """Last resort after a failed test: the servers run in their own sessions."""
    pid_file = run_dir / "postgres" / "postmaster.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
    if shutil.which("redis-cli"):
        subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], check=False)


def _grpcurl_commands(output: list[str]) -> list[list[str]]:
    commands = [shlex.split(line.strip()) for line in output if "-plaintext" in line]
    assert len(commands) == 3, output
    return commands


def _demo_balance(admin_port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        account = admin.GetAccount(admin_pb2.GetAccountRequest(account_id="demo"))
        return account.balance_micros


@pytest.mark.timeout(300)
def test_make_run_serves_the_printed_grpcurl_commands_and_keeps_its_data() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="balance-gate-run-"))
    run_dir.chmod(0o755)  # postgres may run as `nobody`
    redis_port, postgres_port = free_port(), free_port()
    try:
        with dev_stack(run_dir, redis_port, postgres_port) as stack:
            output = stack.wait_ready()
            describe, get_account, authorize = _grpcurl_commands(output)
            assert Path(describe[0]).name == "grpcurl"
            ran = [subprocess.run(c, capture_output=True, text=True, timeout=30, check=False)
                   for c in (describe, get_account, authorize)]  # fmt: skip
            assert all(r.returncode == 0 for r in ran), [r.stderr for r in ran]
            assert "rpc Authorize" in ran[0].stdout
            assert '"balance_micros": "50000000"' in ran[1].stdout
            assert '"allowed": true' in ran[2].stdout

            for port in (stack.gate_port, stack.admin_port):
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest()
                    )
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            metrics_url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
            with urllib.request.urlopen(metrics_url, timeout=10) as response:
                assert b'balance_gate_authorize_total{result="allowed"}' in response.read()
            assert _demo_balance(stack.admin_port) == 49_990_000
        assert stack.process.returncode == 0
        assert not port_is_open(redis_port)
        assert not port_is_open(postgres_port)

        # Same data directory: the debit persisted and the $50 is not credited again.
        with dev_stack(run_dir, redis_port, postgres_port) as again:
            again.wait_ready()
            assert _demo_balance(again.admin_port) == 49_990_000
        assert again.process.returncode == 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
