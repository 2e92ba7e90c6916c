"""Who may call: the admin token, TLS and mutual TLS, proxy identities, limits.

Certificates are made at test time (tests.helpers.CertificateAuthority). A
refused TLS handshake is UNAVAILABLE at the client; whatever the refusal, no
call gets through and no balance changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from balance_gate.auth import AdminTokenInterceptor, parse_tokens, read_token_file
from balance_gate.server import ServerLimits, server_options
from balance_gate.settings import Settings
from balance_gate.v1 import admin_pb2, admin_pb2_grpc, gate_pb2, gate_pb2_grpc
from tests.conftest import serving
from tests.helpers import (
    USD,
    CertificateAuthority,
    authorize_request,
    fund,
    rid,
    tls_files,
    with_settings,
)

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-fedcba9876543210"
CALL_TIMEOUT_S = 10


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# --- the admin token --------------------------------------------------------


@dataclass
class Ports:
    gate: str
    admin: str


@pytest.fixture
async def token_gate(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Ports, Settings]]:
    """A sidecar whose admin API takes TOKEN_A (env) and TOKEN_B (file)."""
    token_file = tmp_path / "admin-tokens"
    token_file.write_text(f"# rotated in on 2026-11-25\n\n  {TOKEN_B}  \n")
    secured = with_settings(settings, admin_tokens=TOKEN_A, admin_token_file=str(token_file))
    async with serving(secured) as (_, listening):
        yield (
            Ports(f"127.0.0.1:{listening.gate_port}", f"127.0.0.1:{listening.admin_port}"),
            secured,
        )


async def test_admin_calls_need_one_of_the_configured_tokens(
    token_gate: tuple[Ports, Settings],
) -> None:
    ports, _ = token_gate
    async with grpc.aio.insecure_channel(ports.admin) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        request = admin_pb2.CreateAccountRequest(account_id="acme-1")
        refusals = {
            "no metadata": None,
            "wrong token": bearer("token-x-0123456789abcdef"),
            "a token's prefix": bearer(TOKEN_A[:-1]),
            "not bearer": (("authorization", f"Basic {TOKEN_A}"),),
            "empty bearer": (("authorization", "Bearer "),),
        }
        for case, metadata in refusals.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.CreateAccount(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
            details = refused.value.details() or ""
            assert "authorization" in details or "token" in details, case
            assert TOKEN_A[:12] not in details, case
            assert "0123456789abcdef" not in details, case
        # Both tokens of a rotation work; the account was not created before.
        created = await admin.CreateAccount(request, metadata=bearer(TOKEN_A))
        assert created.account_id == "acme-1"
        fetched = await admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id="acme-1"), metadata=bearer(TOKEN_B)
        )
        assert fetched.account_id == "acme-1"


async def test_health_is_open_and_reflection_needs_the_token(
    token_gate: tuple[Ports, Settings],
) -> None:
    ports, _ = token_gate
    async with grpc.aio.insecure_channel(ports.admin) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")

        async def services(metadata: tuple[tuple[str, str]] | None) -> set[str]:
            call = stub.ServerReflectionInfo(iter([ask]), metadata=metadata)
            names: set[str] = set()
            async for response in call:
                names |= {s.name for s in response.list_services_response.service}
            return names

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await services(None)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "balance_gate.v1.Admin" in await services(bearer(TOKEN_B))


async def test_the_gate_port_needs_no_admin_token(token_gate: tuple[Ports, Settings]) -> None:
    ports, _ = token_gate
    async with grpc.aio.insecure_channel(ports.gate) as channel:
        answer = await gate_pb2_grpc.BalanceGateStub(channel).Authorize(
            authorize_request("nobody", 1)
        )
        assert answer.code == "account_not_found"


def test_token_checks_look_at_every_token_and_never_print_one(tmp_path: Path) -> None:
    interceptor = AdminTokenInterceptor([TOKEN_A, TOKEN_B])
    assert interceptor.valid(TOKEN_A)
    assert interceptor.valid(TOKEN_B)
    for wrong in ("", TOKEN_A[:-1], TOKEN_A + "x", TOKEN_A.upper(), "é" * 30):
        assert not interceptor.valid(wrong)
    assert parse_tokens(f" {TOKEN_A},, {TOKEN_B} ,") == [TOKEN_A, TOKEN_B]
    short = "tiny-secret"
    with pytest.raises(ValueError, match="token 2 is shorter") as too_short:
        parse_tokens(f"{TOKEN_A},{short}")
    assert short not in str(too_short.value)
    spaced = tmp_path / "tokens"
    spaced.write_text(f"{TOKEN_A}\n# note\nhas a space inside it\n")
    with pytest.raises(ValueError, match="token 2 must be visible ASCII") as bad_file:
        read_token_file(str(spaced))
    assert "space inside" not in str(bad_file.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))


def test_a_non_loopback_admin_listener_needs_a_token(settings: Settings) -> None:
    for address in ("0.0.0.0:50052", "10.1.2.3:50052", "[::]:50052", "admin.internal:50052"):
        with pytest.raises(ValidationError, match="not a loopback address"):
            with_settings(settings, admin_listen=address)
        # The token requirement holds even where the TLS requirement is lifted.
        assert with_settings(
            settings, admin_listen=address, admin_tokens=TOKEN_A, allow_insecure_listen=True
        )
    for address in ("127.0.0.1:0", "localhost:0", "[::1]:0", "127.3.4.5:0"):
        assert with_settings(settings, admin_listen=address).admin_token_values == ()
    with pytest.raises(ValidationError, match="admin_token_file: cannot read"):
        with_settings(settings, admin_token_file="/nonexistent/admin-tokens")


async def test_an_open_loopback_admin_api_is_logged_once(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="balance_gate.server"):
        async with serving(settings):
            pass
    warnings = [r for r in caplog.records if "without a token" in r.getMessage()]
    assert len(warnings) == 1


# --- TLS and mutual TLS -----------------------------------------------------


@dataclass
class Pki:
    ca: CertificateAuthority
    files: dict[str, str]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority("balance-gate test CA")
    return Pki(ca, tls_files(tmp_path, ca))


def tls_channel(
    address: str, pki: Pki, client: tuple[bytes, bytes] | None = None
) -> grpc.aio.Channel:
    key, cert = client or (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.pem, private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(address, credentials)


async def test_tls_without_client_ca_serves_any_tls_client(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    files = {k: v for k, v in pki.files.items() if k != "tls_client_ca_file"}
    async with serving(with_settings(settings, **files)) as (sidecar, listening):
        await fund(sidecar.app, "acme-1", USD)
        address = f"127.0.0.1:{listening.gate_port}"
        async with tls_channel(address, pki) as channel:
            answer = await gate_pb2_grpc.BalanceGateStub(channel).Authorize(
                authorize_request("acme-1", 1_000), timeout=CALL_TIMEOUT_S
            )
            assert answer.allowed
        async with grpc.aio.insecure_channel(address) as channel:
            code = await _code(
                gate_pb2_grpc.BalanceGateStub(channel).Authorize(
                    authorize_request("acme-1", 1_000), timeout=CALL_TIMEOUT_S
                )
            )
            assert code == grpc.StatusCode.UNAVAILABLE
        assert (await sidecar.app.accounts.get("acme-1")).balance_micros == USD - 1_000


async def test_mutual_tls_refuses_clients_without_a_valid_certificate(
    settings: Settings, pki: Pki
) -> None:
    stranger = CertificateAuthority("another CA")
    async with serving(with_settings(settings, **pki.files)) as (sidecar, listening):
        await fund(sidecar.app, "acme-1", USD)
        for port in (listening.gate_port, listening.admin_port):
            address = f"127.0.0.1:{port}"
            refused = {
                "no certificate": tls_channel(address, pki),
                "another CA's certificate": tls_channel(address, pki, stranger.issue("proxy-a")),
                "plaintext": grpc.aio.insecure_channel(address),
            }
            for case, channel in refused.items():
                async with channel:
                    gate = gate_pb2_grpc.BalanceGateStub(channel)
                    admin = admin_pb2_grpc.AdminStub(channel)
                    call = (
                        gate.Authorize(authorize_request("acme-1", 1_000), timeout=CALL_TIMEOUT_S)
                        if port == listening.gate_port
                        else admin.Credit(
                            admin_pb2.CreditRequest(
                                account_id="acme-1",
                                amount_micros=USD,
                                reason="should never land",
                                idempotency_key=rid(),
                            ),
                            timeout=CALL_TIMEOUT_S,
                        )
                    )
                    assert await _code(call) == grpc.StatusCode.UNAVAILABLE, (port, case)
        assert (await sidecar.app.accounts.get("acme-1")).balance_micros == USD
        address = f"127.0.0.1:{listening.gate_port}"
        async with tls_channel(address, pki, pki.ca.issue("proxy-a")) as channel:
            answer = await gate_pb2_grpc.BalanceGateStub(channel).Authorize(
                authorize_request("acme-1", 1_000), timeout=CALL_TIMEOUT_S
            )
            assert answer.allowed
        assert (await sidecar.app.accounts.get("acme-1")).balance_micros == USD - 1_000


def test_tls_settings_must_be_complete(settings: Settings, pki: Pki, tmp_path: Path) -> None:
    files = pki.files
    with pytest.raises(ValidationError, match="go together"):
        with_settings(settings, tls_cert_file=files["tls_cert_file"])
    with pytest.raises(ValidationError, match="tls_client_ca_file needs"):
        with_settings(settings, tls_client_ca_file=files["tls_client_ca_file"])
    with pytest.raises(ValidationError, match="cannot read"):
        with_settings(settings, **{**files, "tls_key_file": str(tmp_path / "missing.pem")})
    with pytest.raises(ValidationError, match="needs tls_client_ca_file"):
        with_settings(settings, proxy_identities={"proxy-a": ["acme-"]})
    tls_only = {k: v for k, v in files.items() if k != "tls_client_ca_file"}
    with pytest.raises(ValidationError, match="needs tls_client_ca_file"):
        with_settings(settings, **tls_only, proxy_identities={"proxy-a": ["acme-"]})
    with pytest.raises(ValidationError, match="non-empty"):
        with_settings(settings, **files, proxy_identities={"proxy-a": []})
    with pytest.raises(ValidationError, match="non-empty"):
        with_settings(settings, **files, proxy_identities={"proxy-a": [""]})


# --- proxy identities -------------------------------------------------------


async def test_proxy_identities_limit_callers_and_their_accounts(
    settings: Settings, pki: Pki
) -> None:
    identities = {"proxy-a": ["acme-", "beta-"], "proxy-b": ["*"]}
    secured = with_settings(settings, **pki.files, proxy_identities=identities)
    async with serving(secured) as (sidecar, listening):
        for account in ("acme-1", "beta-1", "gamma-1"):
            await fund(sidecar.app, account, USD)
        address = f"127.0.0.1:{listening.gate_port}"
        channels = {name: tls_channel(address, pki, pki.ca.issue(name)) for name in identities}
        channels["proxy-c"] = tls_channel(address, pki, pki.ca.issue("proxy-c"))
        stubs = {name: gate_pb2_grpc.BalanceGateStub(ch) for name, ch in channels.items()}
        try:
            await _check_unary(stubs)
            await _check_stream(stubs)
        finally:
            for channel in channels.values():
                await channel.close(None)
        balances = {
            a: (await sidecar.app.accounts.get(a)).balance_micros
            for a in ("acme-1", "beta-1", "gamma-1")
        }
        # proxy-a: acme-1 and beta-1 once each by Authorize and once by stream;
        # proxy-b: gamma-1 the same. Everything refused moved nothing.
        assert balances == {"acme-1": USD - 2_000, "beta-1": USD - 2_000, "gamma-1": USD - 2_000}


async def _check_unary(stubs: dict[str, gate_pb2_grpc.BalanceGateAsyncStub]) -> None:
    allowed = {"proxy-a": ("acme-1", "beta-1"), "proxy-b": ("gamma-1",)}
    for proxy, accounts in allowed.items():
        for account in accounts:
            request = authorize_request(account, 1_000)
            answer = await stubs[proxy].Authorize(request, timeout=CALL_TIMEOUT_S)
            assert answer.allowed, (proxy, account)
            settled = await stubs[proxy].Settle(
                gate_pb2.SettleRequest(
                    account_id=account, request_id=request.request_id, amount_micros=1_000
                ),
                timeout=CALL_TIMEOUT_S,
            )
            assert settled.delta_micros == 0
    refused = [("proxy-a", "gamma-1"), ("proxy-a", "acme"), ("proxy-c", "acme-1")]
    for proxy, account in refused:
        for call in (
            stubs[proxy].Authorize(authorize_request(account, 1_000), timeout=CALL_TIMEOUT_S),
            stubs[proxy].Settle(
                gate_pb2.SettleRequest(account_id=account, request_id=rid(), amount_micros=1),
                timeout=CALL_TIMEOUT_S,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, (proxy, account)
            details = denied.value.details() or ""
            expected = "account_id" if proxy == "proxy-a" else "not a listed proxy"
            assert expected in details, (proxy, account, details)


async def _check_stream(stubs: dict[str, gate_pb2_grpc.BalanceGateAsyncStub]) -> None:
    requests = {
        "acme-1": authorize_request("acme-1", 1_000),
        "gamma-1": authorize_request("gamma-1", 1_000),
        "beta-1": authorize_request("beta-1", 1_000),
    }
    answers = {
        a.request_id: a async for a in stubs["proxy-a"].AuthorizeStream(iter(requests.values()))
    }
    assert answers[requests["acme-1"].request_id].allowed
    assert answers[requests["beta-1"].request_id].allowed
    denied = answers[requests["gamma-1"].request_id]
    assert not denied.allowed
    assert denied.status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert denied.status_message.startswith("account_id:")

    gamma = authorize_request("gamma-1", 1_000)
    assert [a.allowed async for a in stubs["proxy-b"].AuthorizeStream(iter([gamma]))] == [True]

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stubs["proxy-c"].AuthorizeStream(iter([authorize_request("acme-1", 1)])):
            pass
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- limits -----------------------------------------------------------------


def test_every_listener_sets_its_limits_explicitly(settings: Settings) -> None:
    limited = with_settings(
        settings, max_message_bytes=32_768, admin_max_send_bytes=1_048_576, max_concurrent_streams=7
    )
    gate = dict(server_options(ServerLimits.gate(limited), reuse_port=False))
    admin = dict(server_options(ServerLimits.admin(limited), reuse_port=False))
    assert gate["grpc.max_receive_message_length"] == 32_768
    assert gate["grpc.max_send_message_length"] == 32_768
    assert admin["grpc.max_receive_message_length"] == 32_768
    assert admin["grpc.max_send_message_length"] == 1_048_576
    assert gate["grpc.max_concurrent_streams"] == admin["grpc.max_concurrent_streams"] == 7


async def test_an_oversized_message_is_resource_exhausted(settings: Settings) -> None:
    async with serving(with_settings(settings, max_message_bytes=4_096)) as (sidecar, listening):
        await fund(sidecar.app, "acme-1", USD)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listening.gate_port}") as channel:
            gate = gate_pb2_grpc.BalanceGateStub(channel)
            huge = authorize_request("acme-1", 1_000, capability="c" * 5_000)
            assert await _code(gate.Authorize(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The connection still serves calls of a sane size.
            assert (await gate.Authorize(authorize_request("acme-1", 1_000))).allowed
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listening.admin_port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            credit = admin_pb2.CreditRequest(
                account_id="acme-1", amount_micros=USD, reason="r" * 5_000, idempotency_key=rid()
            )
            assert await _code(admin.Credit(credit)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await sidecar.app.accounts.get("acme-1")).balance_micros == USD - 1_000


async def test_streams_beyond_the_limit_on_one_connection_wait(settings: Settings) -> None:
    """With max_concurrent_streams=2, a third stream runs only once one of two open ends."""
    async with serving(with_settings(settings, max_concurrent_streams=2)) as (sidecar, listening):
        await fund(sidecar.app, "acme-1", USD)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listening.gate_port}") as channel:
            gate = gate_pb2_grpc.BalanceGateStub(channel)
            first, second = gate.AuthorizeStream(None), gate.AuthorizeStream(None)
            for stream in (first, second):  # each is open and served: one answer back
                await stream.write(authorize_request("acme-1", 1_000))
                reply = await stream.read()
                assert isinstance(reply, gate_pb2.AuthorizeResponse)
                assert reply.allowed
            third = gate.AuthorizeStream(None)
            sent = asyncio.ensure_future(third.write(authorize_request("acme-1", 1_000)))
            answer = asyncio.ensure_future(third.read())
            # Waiting cannot make this pass by luck: a limit that works holds the third
            # stream however long we look; one that does not lets it through quickly.
            done, _ = await asyncio.wait({sent, answer}, timeout=0.5)
            assert not done
            assert (await sidecar.app.accounts.get("acme-1")).balance_micros == USD - 2_000
            await first.done_writing()
            assert await first.read() is grpc.aio.EOF  # type: ignore[attr-defined]
            await asyncio.wait_for(sent, CALL_TIMEOUT_S)
            reply = await asyncio.wait_for(answer, CALL_TIMEOUT_S)
            assert isinstance(reply, gate_pb2.AuthorizeResponse)
            assert reply.allowed
            second.cancel()
            third.cancel()
        assert (await sidecar.app.accounts.get("acme-1")).balance_micros == USD - 3_000
