"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import random
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from balance_gate.app import App
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2, admin_pb2_grpc, gate_pb2

USD = 1_000_000  # micros


def rid() -> str:
    return uuid.uuid4().hex


async def fund(app: App, account_id: str, micros: int) -> None:
    await app.accounts.create(account_id, "USD")
    await app.accounts.credit(account_id, micros, "test funding", f"fund-{rid()}")


async def fund_over_grpc(
    admin: admin_pb2_grpc.AdminAsyncStub, account_id: str, micros: int
) -> None:
    await admin.CreateAccount(admin_pb2.CreateAccountRequest(account_id=account_id))
    await admin.Credit(
        admin_pb2.CreditRequest(
            account_id=account_id,
            amount_micros=micros,
            reason="test funding",
            idempotency_key=f"fund-{rid()}",
        )
    )


def authorize_request(
    account_id: str, amount_micros: int, request_id: str | None = None, capability: str = ""
) -> gate_pb2.AuthorizeRequest:
    return gate_pb2.AuthorizeRequest(
        account_id=account_id,
        request_id=request_id or rid(),
        amount_micros=amount_micros,
        capability=capability,
    )


async def wait_until_flushed(app: App, timeout_s: float = 15.0) -> None:
    """Wait for the background flusher to have recorded everything in Postgres.

    Polls a condition the flusher's own work makes true; it never sleeps a
    fixed time to hide a race.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        waiting, _ = await app.hot.usage_backlog()
        if waiting == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{waiting} usage events still unflushed after {timeout_s}s")
        await asyncio.sleep(0.02)


async def ledger_balance(app: App, account_id: str) -> int:
    row = await app.pg.get_account(account_id)
    assert row is not None
    return row.ledger_balance_micros


def sidecar_env(
    settings: Settings, ports: dict[str, int] | None = None, **extra: str
) -> dict[str, str]:
    """The environment of a `python -m balance_gate ...` child on this test's servers.

    Same Redis, database and key prefix as `settings`; with `ports` ("gate",
    "admin", "metrics") it listens there; `extra` are further settings by field name.
    """
    env = {
        **os.environ,
        "BALANCE_GATE_REDIS_URL": settings.redis_url.get_secret_value(),
        "BALANCE_GATE_DATABASE_URL": settings.database_url.get_secret_value(),
        "BALANCE_GATE_REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "BALANCE_GATE_REDIS_CLUSTER": "true" if settings.redis_cluster else "false",
    }
    for name, port in (ports or {}).items():
        env[f"BALANCE_GATE_{name.upper()}_LISTEN"] = f"127.0.0.1:{port}"
    env.update({f"BALANCE_GATE_{name.upper()}": value for name, value in extra.items()})
    return env


async def wait_serving(channel: grpc.aio.Channel, process: subprocess.Popen[bytes]) -> None:
    """Wait until a sidecar started as `process` answers on `channel` (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "the sidecar exited during start-up"
        try:
            await asyncio.wait_for(channel.channel_ready(), 1)
            return
        except TimeoutError:
            assert time.monotonic() < deadline, "the sidecar did not start"


def scrape_metrics(port: int) -> str:
    """The /metrics text of a sidecar's metrics port (blocking: call it in a thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def with_settings(settings: Settings, **changes: Any) -> Settings:
    """`settings` with some fields changed, validated again (model_copy would not)."""
    return Settings.model_validate({**settings.model_dump(), **changes})


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A CA made at test time; it issues server and client certificates (PEM)."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._build(name, self.key, ca=True).sign(self.key, hashes.SHA256())
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _build(
        self, common_name: str, key: ec.EllipticCurvePrivateKey, *, ca: bool
    ) -> x509.CertificateBuilder:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if ca else self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    def issue(self, common_name: str, *, server: bool = False) -> tuple[bytes, bytes]:
        """(private key, certificate) in PEM; a server certificate names 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._build(common_name, key, ca=False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem(key), cert.public_bytes(serialization.Encoding.PEM)


def tls_files(directory: Path, ca: CertificateAuthority) -> dict[str, str]:
    """A server certificate from `ca` and the CA itself as files: the TLS settings."""
    key, cert = ca.issue("balance-gate", server=True)
    files = {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": ca.pem}
    for name, pem in files.items():
        (directory / f"{name}.pem").write_bytes(pem)
    return {name: str(directory / f"{name}.pem") for name in files}


def free_ports_in_a_row(count: int) -> int:
    """A port p such that p .. p + count - 1 are all free (--workers N serves /metrics
    on the metrics port + i).

    Chosen below the kernel's ephemeral range: a worker binds its port seconds
    after this check, and meanwhile any outgoing connection may be handed an
    ephemeral port (CI saw worker 1 fail with EADDRINUSE on metrics port + 1).
    """
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        first = random.randrange(10_000, ephemeral_low - count)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first


def mutual_tls_files(directory: Path, client_name: str) -> tuple[dict[str, str], str, str]:
    """A new CA's server TLS settings (tls_files) and a client certificate's (cert, key) paths."""
    ca = CertificateAuthority(f"{client_name} test CA")
    files = tls_files(directory, ca)
    key, cert = ca.issue(client_name)
    (directory / f"{client_name}.key").write_bytes(key)
    (directory / f"{client_name}.pem").write_bytes(cert)
    return files, str(directory / f"{client_name}.pem"), str(directory / f"{client_name}.key")
