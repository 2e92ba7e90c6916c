"""`make bench`: the gate against the limits it is built on, in one run.

Starts its own Redis and Postgres (balance_gate.devservers, as `make run`
does), the sidecar (`balance-gate serve`) and the no-op server with the same
worker count, funds the benchmark accounts, then drives both with the same
load generator (bench/loadgen.py) and runs redis-benchmark on the same debit
script. Prints a table with the ratios ours/limit, writes results.json and a
plot of latency against offered load into --out.

    python bench/run.py --out bench/results            # the full run
    python bench/run.py --smoke --out /tmp/bench       # 2 s of tiny load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen

from balance_gate.devservers import PostgresServer, RedisServer, free_port
from balance_gate.keys import Keys
from balance_gate.redis_store import script_source
from balance_gate.v1 import admin_pb2, admin_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ACCOUNT_FUNDING_MICROS = 1_000_000_000_000  # $1M each: the benchmark never runs dry


@dataclass(frozen=True)
class Scale:
    duration_s: float
    warmup_s: float
    accounts: int
    worker_counts: tuple[int, ...]
    load_fractions: tuple[float, ...]
    concurrency: int
    stream_window: int
    redis_requests: int


FULL = Scale(5.0, 1.0, 200, (1, 2), (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.2), 64, 256, 200_000)
SMOKE = Scale(1.0, 0.3, 5, (1,), (0.1,), 4, 8, 2_000)


# --- processes ------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (the workers), from /proc."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


@contextmanager
def _process(
    args: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool]
) -> Iterator[int]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{args[0]} did not start; see {log}:\n{log.read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serving(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
            except grpc.FutureTimeoutError:
                return False
        return True

    return check


# --- set-up --------------------------------------------------------------------


async def _fund(admin_port: int, accounts: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for i in range(accounts):
            account_id = f"bench-{i}"
            try:
                await admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id=account_id))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            await admin.Credit(
                admin_pb2.CreditRequest(
                    account_id=account_id,
                    amount_micros=ACCOUNT_FUNDING_MICROS,
                    reason="benchmark funding",
                    idempotency_key=f"bench-funding-{account_id}",
                )
            )


# --- measurements ---------------------------------------------------------------


class Bench:
    def __init__(self, scale: Scale, work: Path) -> None:
        self.scale = scale
        self.work = work
        self.store_pids: dict[str, int] = {}  # redis, postgres: their CPU is counted too
        self.results: dict[str, Any] = {"runs": [], "redis_benchmark": {}}
        self.counter = 0

    def load(
        self, name: str, port: int, server_pid: int, *, mode: str = "unary", **plan: Any
    ) -> dict[str, Any]:
        self.counter += 1
        processes = plan.pop("processes", 1)
        base = loadgen.Plan(
            target=f"127.0.0.1:{port}",
            mode=mode,
            duration_s=self.scale.duration_s,
            warmup_s=self.scale.warmup_s,
            concurrency=self.scale.concurrency,
            rate=0.0,
            channels=2,
            streams=1,
            accounts=self.scale.accounts,
            amount_micros=1,
            run_id=f"b{os.getpid()}-{self.counter}",
        )
        for key, value in plan.items():
            setattr(base, key, value)
        cpu_before = _cpu_seconds(server_pid)
        stores_before = {name: _cpu_seconds(pid) for name, pid in self.store_pids.items()}
        result = loadgen.run(base, processes)
        server_cpu = _cpu_seconds(server_pid) - cpu_before
        stores_cpu = {
            name: _cpu_seconds(pid) - stores_before[name] for name, pid in self.store_pids.items()
        }
        result["name"] = name
        # Over the whole run, warm-up included, so divided by every call answered.
        # It includes the background work the calls cause (flushing, lease reports).
        answered = result["answered_all"]
        result["server_cpu_us_per_call"] = server_cpu / answered * 1e6 if answered else 0.0
        for name, seconds in stores_cpu.items():
            result[f"{name}_cpu_us_per_call"] = seconds / answered * 1e6 if answered else 0.0
        self.results["runs"].append(result)
        print(_row(result), flush=True)
        return result

    def redis_benchmark(self, redis_port: int, sha: str, keys: list[str], account: str) -> None:
        """The debit script itself, unpipelined and pipelined, each call a new request id."""
        tool = shutil.which("redis-benchmark")
        if tool is None:
            print("redis-benchmark not found (apt-get install redis-tools): skipped")
            return
        # The last one is the attempt token the gate sends with every call (hex in real use).
        script_args = [
            "1", "-1", "172800", account, "r__rand_int__", "", "600", "1000000000", "0",
            "a__rand_int__",
        ]  # fmt: skip
        before = _balance(redis_port, keys[0])
        for label, pipeline in (("unpipelined", 1), ("pipelined_16", 16)):
            command = [
                tool, "-p", str(redis_port), "-n", str(self.scale.redis_requests),
                "-c", "50", "-P", str(pipeline), "-r", "1000000000", "--csv",
                "EVALSHA", sha, str(len(keys)), *keys, *script_args,
            ]  # fmt: skip
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row = output.strip().splitlines()[-1].replace('"', "").split(",")
            self.results["redis_benchmark"][label] = {
                "rps": float(row[1]),
                "p50_us": float(row[4]) * 1000,
                "p99_us": float(row[6]) * 1000,
                "command": " ".join(command),
            }
            print(f"redis-benchmark EVALSHA authorize {label}: {float(row[1]):,.0f}/s", flush=True)
        debited = before - _balance(redis_port, keys[0])
        # __rand_int__ repeats now and then: a repeat is a replay, not a debit.
        self.results["redis_benchmark"]["debited_share"] = debited / (2 * self.scale.redis_requests)
        command = [tool, "-p", str(redis_port), "-n", "20000", "-c", "1", "--csv", "PING"]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = output.strip().splitlines()[-1].replace('"', "").split(",")
        self.results["redis_round_trip_p50_us"] = float(row[4]) * 1000


def _row(result: dict[str, Any]) -> str:
    return (
        f"{result['name']:<34} {result['throughput']:>9,.0f}/s  p50 {result['p50_us']:>7,.0f}us"
        f"  p99 {result['p99_us']:>7,.0f}us  p99.9 {result['p999_us']:>7,.0f}us"
        f"  server {result['server_cpu_us_per_call']:>5,.0f}us CPU/call"
        f" (redis {result.get('redis_cpu_us_per_call', 0):>3,.0f}"
        f" pg {result.get('postgres_cpu_us_per_call', 0):>3,.0f})"
        f"  client {result['generator_cpu_per_s']:.2f} cores"
        f"  denied {result['denied']} errors {result['errors']}"
    )


def _balance(redis_port: int, account_key: str) -> int:
    cli = shutil.which("redis-cli") or "redis-cli"
    out = subprocess.run(
        [cli, "-p", str(redis_port), "HGET", account_key, "balance"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def _script_sha(redis_port: int) -> str:
    source = script_source("authorize")
    cli = shutil.which("redis-cli") or "redis-cli"
    out = subprocess.run(
        [cli, "-p", str(redis_port), "SCRIPT", "LOAD", source],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# --- the run -------------------------------------------------------------------


def run(scale: Scale, out_dir: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="balance-gate-bench-"))
    work.chmod(0o755)
    redis = RedisServer(work / "redis", free_port(), durable=False)
    postgres = PostgresServer(work / "postgres", free_port(), durable=False)
    bench = Bench(scale, work)
    try:
        redis.start()
        postgres.start()
        postgres.ensure_database("balance_gate")
        for name, server in (("redis", redis), ("postgres", postgres)):
            if server.pid is not None:
                bench.store_pids[name] = server.pid
        bench.results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
        for workers in scale.worker_counts:
            _measure_workers(bench, redis, postgres, workers)
        _measure_leased(bench, redis, postgres)
        sha = _script_sha(redis.port)
        # The real keys of a funded account that no load touched (so no sidecar
        # holds a lease of it), so every call is a real debit.
        account = f"bench-{scale.accounts}"
        keys = list(Keys("bg").hot(account).for_request("r__rand_int__"))
        bench.redis_benchmark(redis.port, sha, keys, account)
    finally:
        postgres.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(bench.results)
    bench.results["summary"] = summary
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(bench.results, indent=2))
    plot(bench.results, out_dir / "latency-vs-load.png")
    print(format_summary(summary))
    return bench.results


def _env(redis: RedisServer, postgres: PostgresServer, ports: dict[str, int]) -> dict[str, str]:
    return {
        **os.environ,
        "BALANCE_GATE_REDIS_URL": redis.url,
        "BALANCE_GATE_DATABASE_URL": postgres.dsn("balance_gate"),
        "BALANCE_GATE_GATE_LISTEN": f"127.0.0.1:{ports['gate']}",
        "BALANCE_GATE_ADMIN_LISTEN": f"127.0.0.1:{ports['admin']}",
        "BALANCE_GATE_METRICS_LISTEN": f"127.0.0.1:{ports['metrics']}",
        "BALANCE_GATE_LOG_LEVEL": "WARNING",
    }


def _measure_workers(
    bench: Bench, redis: RedisServer, postgres: PostgresServer, workers: int
) -> None:
    scale = bench.scale
    ports = {"gate": free_port(), "admin": free_port(), "metrics": free_port(), "noop": free_port()}
    env = _env(redis, postgres, ports)
    gate_args = [str(BIN / "balance-gate"), "serve", "--workers", str(workers)]
    noop_args = [
        sys.executable, str(ROOT / "bench/noop_server.py"),
        "--listen", f"127.0.0.1:{ports['noop']}", "--workers", str(workers),
    ]  # fmt: skip
    w = f"w{workers}"
    with (
        _process(gate_args, env, bench.work / f"gate-{w}.log", _serving(ports["gate"])) as gate,
        _process(noop_args, env, bench.work / f"noop-{w}.log", _serving(ports["noop"])) as noop,
    ):
        # One more than the load uses: redis-benchmark's own account (never leased).
        asyncio.run(_fund(ports["admin"], scale.accounts + 1))
        gen = max(1, workers)  # one generator process per server process
        targets = (("gate", ports["gate"], gate), ("noop", ports["noop"], noop))
        for name, port, pid in targets:
            bench.load(f"{name} unary {w}", port, pid, processes=gen)
        for name, port, pid in targets:
            bench.load(
                f"{name} stream {w}", port, pid,
                mode="stream", processes=gen, concurrency=scale.stream_window,
            )  # fmt: skip
        if workers != scale.worker_counts[0]:
            return
        for name, port, pid in targets:
            bench.load(f"{name} low-load {w}", port, pid, concurrency=1, channels=1)
        noop_max = max(
            r["throughput"] for r in bench.results["runs"] if r["name"] == f"noop unary {w}"
        )
        for fraction in scale.load_fractions:
            for name, port, pid in targets:
                rate = max(1.0, noop_max * fraction)
                result = bench.load(f"{name} open {fraction:.2f} {w}", port, pid, rate=rate)
                result["offered"] = rate


def _measure_leased(bench: Bench, redis: RedisServer, postgres: PostgresServer) -> None:
    """The gate with balance leasing on for the benchmark accounts (docs/leasing.md)."""
    ports = {"gate": free_port(), "admin": free_port(), "metrics": free_port()}
    env = {
        **_env(redis, postgres, ports),
        "BALANCE_GATE_LEASE_ACCOUNTS": "bench-",
        "BALANCE_GATE_LEASE_MIN_RATE": "2",
        "BALANCE_GATE_LEASE_IDLE_MS": "10000",
    }
    args = [str(BIN / "balance-gate"), "serve"]
    with _process(args, env, bench.work / "gate-leased.log", _serving(ports["gate"])) as pid:
        # Leases open after a second of steady traffic per account: warm up longer.
        warm = bench.scale.warmup_s * 3
        bench.load(
            "leased low-load w1", ports["gate"], pid, concurrency=1, channels=1, warmup_s=warm
        )
        bench.load("leased unary w1", ports["gate"], pid, warmup_s=warm)
        bench.load(
            "leased stream w1", ports["gate"], pid,
            mode="stream", concurrency=bench.scale.stream_window, warmup_s=warm,
        )  # fmt: skip


# --- report --------------------------------------------------------------------


def _find(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if r["name"] == name), None)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    def ratio(ours: str, limit: str, key: str = "throughput") -> float | None:
        a, b = _find(results, ours), _find(results, limit)
        return a[key] / b[key] if a and b and b[key] else None

    summary: dict[str, Any] = {
        "unary_throughput_vs_noop_w1": ratio("gate unary w1", "noop unary w1"),
        "stream_throughput_vs_noop_stream_w1": ratio("gate stream w1", "noop stream w1"),
        "stream_vs_unary_gate_w1": ratio("gate stream w1", "gate unary w1"),
        "unary_throughput_vs_noop_w2": ratio("gate unary w2", "noop unary w2"),
        "gate_unary_w2_vs_w1": ratio("gate unary w2", "gate unary w1"),
        "noop_unary_w2_vs_w1": ratio("noop unary w2", "noop unary w1"),
    }
    summary["leased_unary_vs_noop_w1"] = ratio("leased unary w1", "noop unary w1")
    summary["leased_stream_vs_noop_stream_w1"] = ratio("leased stream w1", "noop stream w1")
    summary["leased_stream_vs_leased_unary_w1"] = ratio("leased stream w1", "leased unary w1")
    gate_low, noop_low = _find(results, "gate low-load w1"), _find(results, "noop low-load w1")
    leased_low = _find(results, "leased low-load w1")
    if leased_low:
        summary["leased_low_load_p50_us"] = leased_low["p50_us"]
    if gate_low and noop_low:
        summary["low_load_p50_us"] = {"gate": gate_low["p50_us"], "noop": noop_low["p50_us"]}
        summary["low_load_p50_overhead_us"] = gate_low["p50_us"] - noop_low["p50_us"]
        summary["redis_round_trip_p50_us"] = results.get("redis_round_trip_p50_us")
    gate_unary = _find(results, "gate unary w1")
    if gate_unary:
        summary["gate_server_cpu_us_per_authorize"] = gate_unary["server_cpu_us_per_call"]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "summary (ratios taken in this run):"]
    for key, value in summary.items():
        if isinstance(value, float):
            lines.append(f"  {key:<40} {value:.2f}")
        elif value is not None:
            lines.append(f"  {key:<40} {value}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for name, style in (("gate", "o-"), ("noop", "s--")):
        runs = sorted(
            (r for r in results["runs"] if re.match(rf"{name} open ", r["name"])),
            key=lambda r: r["offered"],
        )
        if not runs:
            continue
        offered = [r["offered"] for r in runs]
        for key, label in (("p50_us", "p50"), ("p99_us", "p99")):
            axis.plot(offered, [r[key] / 1000 for r in runs], style, label=f"{name} {label}")
    axis.set_xlabel("offered load (Authorize calls/s, unary, 1 worker)")
    axis.set_ylabel("latency (ms, from scheduled start)")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    axis.set_title("balance-gate Authorize vs a no-op grpc.aio server")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny load, about 2 s per target")
    args = parser.parse_args(argv)
    run(SMOKE if args.smoke else FULL, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
