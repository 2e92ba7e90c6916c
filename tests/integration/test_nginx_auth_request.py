"""A real nginx (Debian's package) in front of a tiny upstream, with deploy/nginx's
configuration: requests through nginx are debited, and the one that cannot pay gets
402 insufficient_balance as JSON."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from balance_gate.app import App
from balance_gate.devservers import free_port
from balance_gate.settings import Settings
from tests.conftest import serving
from tests.helpers import fund, wait_until_flushed

ROOT = Path(__file__).resolve().parents[2]
CENT = 10_000  # the price deploy/nginx/balance-gate.conf sets per request


def _nginx() -> str:
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(path).exists():
        pytest.fail("nginx not found: run `make deps` (apt-get install nginx)")
    return path


async def _upstream() -> tuple[web.AppRunner, int]:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello from upstream")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


def _write_config(work: Path, authz_port: int, upstream_port: int, nginx_port: int) -> Path:
    site = (ROOT / "deploy/nginx/balance-gate.conf").read_text()
    for default, port in (("50080", authz_port), ("8080", upstream_port), ("8000", nginx_port)):
        site = site.replace(f"127.0.0.1:{default};", f"127.0.0.1:{port};")
    (work / "balance-gate.conf").write_text(site)
    temp = " ".join(
        f"{kind}_temp_path {work}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = work / "nginx.conf"
    config.write_text(
        f"daemon off; master_process off; worker_processes 1;\n"
        f"pid {work}/nginx.pid; error_log {work}/error.log warn;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{ access_log off; {temp} include {work}/balance-gate.conf; }}\n"
    )
    return config


@pytest.fixture
async def nginx_in_front(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[int, App]]:
    http_settings = settings.model_copy(update={"http_authz_listen": "127.0.0.1:0"})
    upstream, upstream_port = await _upstream()
    async with serving(http_settings) as (sidecar, listening):
        assert listening.http_authz_port is not None
        nginx_port = free_port()
        config = _write_config(tmp_path, listening.http_authz_port, upstream_port, nginx_port)
        process = _start_nginx(config, tmp_path)
        try:
            await _wait_listening(nginx_port, process, tmp_path / "error.log")
            yield nginx_port, sidecar.app
        finally:
            process.terminate()
            process.wait(timeout=10)
    await upstream.cleanup()


def _start_nginx(config: Path, work: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [_nginx(), "-c", str(config), "-p", str(work), "-e", str(work / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _exited(process: subprocess.Popen[bytes], log: Path) -> str:
    return "" if process.poll() is None else f"nginx exited: {log.read_text()}"


async def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(200):
        assert not _exited(process, log), _exited(process, log)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)  # polling nginx's start, bounded
            continue
        writer.close()
        return
    raise AssertionError("nginx did not listen")


async def test_requests_through_nginx_are_debited_and_the_unpaid_one_gets_402(
    nginx_in_front: tuple[int, App],
) -> None:
    port, app = nginx_in_front
    await fund(app, "demo", 2 * CENT + CENT // 2)
    url = f"http://127.0.0.1:{port}/v1/things"
    key = {"X-Api-Key": "demo-api-key"}
    async with aiohttp.ClientSession() as client:
        answers = []
        for _ in range(3):
            async with client.get(url, headers=key) as response:
                answers.append((response.status, await response.text(), dict(response.headers)))
        async with client.get(url) as response:  # no API key: no account
            anonymous = (response.status, await response.json())

    assert [status for status, _, _ in answers] == [200, 200, 402]
    assert answers[0][1] == "hello from upstream"
    assert answers[2][2]["Content-Type"].startswith("application/json")
    assert '"insufficient_balance"' in answers[2][1]
    assert answers[1][2]["X-Balance-Low"] == "1"  # 0.5 cent left, no auto top-up
    assert anonymous[0] == 403
    assert anonymous[1]["error"]["code"] == "invalid_request"

    await wait_until_flushed(app)
    hot = await app.hot.read_account("demo")
    assert hot is not None
    assert hot.balance_micros == CENT // 2
    recorded = await app.pool.fetchval(
        "SELECT count(*) FROM usage_events WHERE account_id = 'demo'"
    )
    assert recorded == 2
