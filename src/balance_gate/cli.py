"""Command line: `balance-gate serve | migrate | rebuild | audit | fx | report | dev |
admin | healthcheck`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop

from balance_gate import admin_cli, logs
from balance_gate.settings import Settings


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop (less CPU per call than asyncio's own loop)."""
    uvloop.run(main)


def _run_reporting_failure(command: str, main: Coroutine[Any, Any, None]) -> int:
    """Run an operator command; a failure is one error line and exit 2, not a traceback
    (issue 13 item 3): the operator needs what failed, and a script needs the status."""
    try:
        _run(main)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, never a crash
        print(f"{command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    if args.workers is not None:
        settings = Settings(workers=args.workers)  # validated again: fixed ports
    if settings.workers == 1:
        _serve_worker(settings, None)
        return 0
    from balance_gate.workers import supervise

    return supervise(functools.partial(_serve_worker, settings), settings.workers)


def _serve_worker(settings: Settings, index: int | None) -> None:
    from balance_gate.server import serve

    if index is not None:  # a spawned worker: a fresh interpreter, logging unset
        from balance_gate.workers import exit_with_parent

        exit_with_parent()
        logs.configure(settings.log_level, settings.log_format, worker=index)
        host, port = settings.metrics_address
        # Validated anew: model_copy would keep the cached metrics_address.
        settings = Settings.model_validate(
            {**settings.model_dump(), "metrics_listen": f"{host}:{port + index}"}
        )
    _run(serve(settings))


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from balance_gate import migrations
    from balance_gate.app import postgres_pool

    async def migrate() -> None:
        pool = await postgres_pool(settings)
        try:
            async with pool.acquire() as conn:
                applied = await migrations.migrate(conn)
            print(f"applied migrations: {applied or 'none (up to date)'}")
        finally:
            await pool.close()

    _run(migrate())
    return 0


def cmd_rebuild(settings: Settings, _args: argparse.Namespace) -> int:
    from balance_gate.app import App
    from balance_gate.rebuild import rebuild_all

    async def rebuild() -> None:
        # Schema changes are `migrate`'s job, not a side effect of a rebuild.
        async with App.opened(settings, migrate=False) as app:
            await app.hot.ensure_usage_groups()
            report = await rebuild_all(app.pg, app.accounts, app.flusher)
        print(
            f"rebuilt {report.accounts} accounts: {report.corrected} corrected"
            f" (total |correction| {report.correction_micros} micros),"
            f" {report.pending_usage_recorded} unacknowledged usage events recorded"
            + (
                f", {report.usage_set_aside} usage events set aside in usage_dead_letters"
                if report.usage_set_aside
                else ""
            )
        )

    return _run_reporting_failure("rebuild", rebuild())


def cmd_audit(settings: Settings, _args: argparse.Namespace) -> int:
    """Exit 1 when any hot balance differs from the ledger, or the ledger's usage
    does not add up (audit.py)."""
    from balance_gate.app import App
    from balance_gate.audit import audit_all, format_report

    clean = True

    async def audit() -> None:
        nonlocal clean
        async with App.opened(settings, migrate=False) as app:
            await app.hot.ensure_usage_groups()
            report = await audit_all(app.pg, app.hot, app.flusher)
        print("\n".join(format_report(report)))
        clean = report.clean

    failed = _run_reporting_failure("audit", audit())
    return failed or (0 if clean else 1)


def cmd_fx_load(settings: Settings, args: argparse.Namespace) -> int:
    """Load a CSV of rates, all or nothing, with the same plausibility check as SetFxRates."""
    from balance_gate.app import postgres_pool
    from balance_gate.errors import GateError
    from balance_gate.fx import FxRates

    async def load() -> None:
        pool = await postgres_pool(settings)
        try:
            rates = FxRates(pool, settings.fx_rate_max_change_pct)
            stored = await rates.load_csv(Path(args.file), args.force_reason)
        finally:
            await pool.close()
        print(f"stored {stored} rates from {args.file}")

    try:
        _run(load())
    except GateError as exc:
        print(f"error: {exc}; nothing was stored", file=sys.stderr)
        return 2
    return 0


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    """P15: the monthly report of every account, as CSV or JSON lines, on stdout."""
    from balance_gate.app import App
    from balance_gate.reports import write_reports

    async def report() -> None:
        async with App.opened(settings, migrate=False) as app:
            await write_reports(app.pool, app.topups, args.month, args.format, sys.stdout)

    _run(report())
    return 0


def cmd_dev(_settings: Settings, args: argparse.Namespace) -> int:
    from balance_gate.devstack import run_dev

    return run_dev(Path(args.run_dir), args.redis_port, args.postgres_port)


def cmd_healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when grpc.health.v1 on the gate port answers SERVING, else 1 (a container
    HEALTHCHECK; plaintext only, like Kubernetes' own gRPC probe)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from balance_gate.settings import split_host_port

    host, port = split_host_port(args.address or settings.gate_listen)
    if host in ("0.0.0.0", "::", ""):  # a wildcard listener answers on loopback
        host = "127.0.0.1"
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{target}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balance-gate",
        description="Prepaid-balance gate for proxies. Settings: BALANCE_GATE_* variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gate and admin gRPC APIs")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the ports (default: BALANCE_GATE_WORKERS, 1)",
    )
    serve.set_defaults(func=cmd_serve)
    commands.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    commands.add_parser(
        "rebuild", help="reconcile every hot balance in Redis with the Postgres ledger"
    ).set_defaults(func=cmd_rebuild)
    commands.add_parser(
        "audit",
        help="compare every hot balance with the Postgres ledger, and check that the"
        " ledger's usage adds up (exit 1 on a finding)",
    ).set_defaults(func=cmd_audit)
    fx = commands.add_parser("fx", help="FX rates (P6)").add_subparsers(dest="fx", required=True)
    load = fx.add_parser("load", help="load daily rates from a CSV: date,base,quote,rate")
    load.add_argument("file")
    load.add_argument(
        "--force-reason",
        default="",
        help="store rates more than BALANCE_GATE_FX_RATE_MAX_CHANGE_PCT away from the last"
        " ones, for this reason (logged)",
    )
    load.set_defaults(func=cmd_fx_load)
    report = commands.add_parser(
        "report", help="the monthly report (P15) of every account, on stdout"
    )
    report.add_argument("--month", required=True, help="YYYY-MM, in each account's time zone")
    report.add_argument("--format", choices=["csv", "json"], default="csv")
    report.set_defaults(func=cmd_report)
    dev = commands.add_parser(
        "dev", help="run with a local Redis and Postgres under --run-dir and a funded demo account"
    )
    dev.add_argument("--run-dir", default=".run", help="where the local servers keep their data")
    dev.add_argument("--redis-port", type=int, default=56379)
    dev.add_argument("--postgres-port", type=int, default=55432)
    dev.set_defaults(func=cmd_dev)
    admin_cli.add_parser(commands)
    health = commands.add_parser(
        "healthcheck", help="exit 0 when grpc.health.v1 on the gate port answers SERVING, else 1"
    )
    health.add_argument("--address", help="host:port (default: BALANCE_GATE_GATE_LISTEN)")
    health.add_argument("--service", default="", help="service name to check (default: all)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    health.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "admin":  # a client: it needs none of the sidecar's settings
        return admin_cli.run(args)
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.func(settings, args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
