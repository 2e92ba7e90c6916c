"""`make run` (balance-gate dev): the gate with its own Redis and Postgres and a demo account.

Data lives under --run-dir (default ./.run) and is reused on the next start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from balance_gate.devservers import PostgresServer, RedisServer
from balance_gate.errors import AlreadyExists
from balance_gate.server import Listening, Sidecar, serve
from balance_gate.settings import Settings

DEMO_ACCOUNT = "demo"
DEMO_FUNDING_MICROS = 50_000_000  # $50.00
DEMO_FUNDING_KEY = "demo-initial-funding"
DATABASE = "balance_gate"


def run_dev(run_dir: Path, redis_port: int, postgres_port: int) -> int:
    run_dir = run_dir.resolve()
    redis = RedisServer(run_dir / "redis", redis_port, durable=True)
    postgres = PostgresServer(run_dir / "postgres", postgres_port, durable=True)
    try:
        redis.start()
        postgres.start()
        postgres.ensure_database(DATABASE)
        # The dev stack's own servers win over whatever the environment says.
        os.environ["BALANCE_GATE_REDIS_URL"] = redis.url
        os.environ["BALANCE_GATE_DATABASE_URL"] = postgres.dsn(DATABASE)
        settings = Settings()
        print(f"redis:    {redis.url}  (data in {redis.data_dir})", flush=True)
        print(f"postgres: {postgres.dsn(DATABASE)}  (data in {postgres.data_dir})", flush=True)

        from balance_gate.cli import _run

        _run(serve(settings, on_ready=_seed_and_greet))
    except KeyboardInterrupt:
        pass
    finally:
        postgres.stop()
        redis.stop()
    return 0


async def _seed_and_greet(sidecar: Sidecar, listening: Listening) -> None:
    accounts = sidecar.app.accounts
    with contextlib.suppress(AlreadyExists):
        await accounts.create(DEMO_ACCOUNT, "USD")
    # Keyed: funds the demo account once, however often `make run` starts.
    await accounts.credit(
        DEMO_ACCOUNT, DEMO_FUNDING_MICROS, "demo account funding", DEMO_FUNDING_KEY
    )
    account = await accounts.get(DEMO_ACCOUNT)
    print(greeting(sidecar.app.settings, listening, account.balance_micros), flush=True)


def grpcurl_path() -> str:
    if shutil.which("grpcurl"):
        return "grpcurl"
    beside_python = Path(sys.executable).parent / "grpcurl"
    return str(beside_python) if beside_python.exists() else "grpcurl"


def greeting(settings: Settings, listening: Listening, balance_micros: int) -> str:
    grpcurl = f"{grpcurl_path()} -plaintext"
    request = f'"account_id": "{DEMO_ACCOUNT}", "request_id": "demo-req-1", "amount_micros": 10000'
    authorize = f"'{{{request}}}'"
    gate_host = settings.gate_address[0]
    admin_host = settings.admin_listen.rpartition(":")[0]
    gate = f"{gate_host}:{listening.gate_port}"
    admin = f"{admin_host}:{listening.admin_port}"
    metrics_host = settings.metrics_address[0]
    return f"""
balance-gate is running (Ctrl-C to stop).
  gate API:  {gate}
  admin API: {admin}
  metrics:   http://{metrics_host}:{listening.metrics_port}/metrics
  account '{DEMO_ACCOUNT}' balance: {balance_micros} micros

Try it from another terminal:
  {grpcurl} {gate} describe balance_gate.v1.BalanceGate
  {grpcurl} -d '{{"account_id": "{DEMO_ACCOUNT}"}}' {admin} balance_gate.v1.Admin/GetAccount
  {grpcurl} -d {authorize} {gate} balance_gate.v1.BalanceGate/Authorize
ready""".lstrip("\n")
