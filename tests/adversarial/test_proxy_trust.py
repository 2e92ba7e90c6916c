"""Issue 12 item 2: the price and the caller come from what the operator controls.

- ext_authz: a client's x-balance-cost-micros header never sets its own price; only
  the route's context_extensions do (unless EXT_AUTHZ_HEADER_PRICE says otherwise),
  and a route that names no price is refused rather than served for free.
- The HTTP endpoint, with a proxy secret, answers nobody who lacks it; with mutual
  TLS, nobody without a client certificate.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from balance_gate.settings import Settings
from tests.conftest import RunningGate, running_gate, serving
from tests.helpers import CertificateAuthority, fund, rid, tls_files, with_settings

CENT = 10_000
SECRET = "proxy-secret-0123456789abcdef0123"


def _check(headers: dict[str, str], extensions: dict[str, str] | None = None) -> Any:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.headers.update(headers)
    request.attributes.context_extensions.update(extensions or {})
    return request


async def _balance(gate: RunningGate, account_id: str) -> int:
    account = await gate.app.hot.read_account(account_id)
    assert account is not None
    return account.balance_micros


async def test_a_client_cost_header_does_not_price_an_ext_authz_request(
    running: RunningGate,
) -> None:
    """Before: with no context_extensions, the client's 'x-balance-cost-micros: 0' was the
    price, and every request was served for free."""
    await fund(running.app, "acme", CENT)
    stub = external_auth_pb2_grpc.AuthorizationStub(running.gate_channel)
    forged = {"x-balance-account": "acme", "x-request-id": rid(), "x-balance-cost-micros": "0"}
    answer = await stub.Check(_check(forged))
    assert answer.status.code != 0
    assert answer.denied_response.status.code == 400
    error = json.loads(answer.denied_response.body)["error"]
    assert "x-balance-cost-micros" in error["message"]
    assert "context_extensions" in error["message"]

    # The route's price stands whatever the client's header says.
    forged["x-request-id"] = rid()
    priced = await stub.Check(_check(forged, {"x-balance-cost-micros": str(CENT)}))
    assert priced.status.code == 0
    assert await _balance(running, "acme") == 0


async def test_header_prices_only_when_the_operator_allows_them(settings: Settings) -> None:
    allowed = with_settings(settings, ext_authz_header_price=True)
    async with running_gate(allowed) as gate:
        await fund(gate.app, "acme", CENT)
        stub = external_auth_pb2_grpc.AuthorizationStub(gate.gate_channel)
        headers = {
            "x-balance-account": "acme",
            "x-request-id": rid(),
            "x-balance-cost-micros": str(CENT),
        }
        answer = await stub.Check(_check(headers))
        assert answer.status.code == 0
        assert await _balance(gate, "acme") == 0


async def _get(url: str, headers: dict[str, str], **kwargs: Any) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers, **kwargs) as r:
        await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


async def test_the_http_endpoint_answers_only_the_proxy_holding_the_secret(
    settings: Settings,
) -> None:
    """Before: the HTTP endpoint had no caller authentication at all."""
    secured = with_settings(settings, http_authz_listen="127.0.0.1:0", http_authz_secret=SECRET)
    async with running_gate(secured) as gate:
        await fund(gate.app, "acme", CENT)
        url = f"http://127.0.0.1:{gate.listening.http_authz_port}/authorize"
        request = {"x-balance-account": "acme", "x-balance-cost-micros": str(CENT)}
        for secret in (None, "", "wrong", SECRET[:-1], SECRET + "x"):
            headers = {**request, "x-request-id": rid()}
            if secret is not None:
                headers["x-balance-gate-proxy-secret"] = secret
            status, answer = await _get(url, headers)
            assert (status, answer["x-balance-gate-code"]) == (401, "proxy_unauthenticated")
        assert await _balance(gate, "acme") == CENT
        proven = {**request, "x-request-id": rid(), "x-balance-gate-proxy-secret": SECRET}
        status, _ = await _get(url, proven)
        assert status == 200
        assert await _balance(gate, "acme") == 0


def _pki(directory: Path) -> dict[str, str]:
    """The server's TLS settings from a new CA, and a client certificate 'proxy-a' in
    `directory` (proxy.pem, proxy.key)."""
    ca = CertificateAuthority("http endpoint CA")
    files = tls_files(directory, ca)
    key, cert = ca.issue("proxy-a")
    (directory / "proxy.key").write_bytes(key)
    (directory / "proxy.pem").write_bytes(cert)
    return files


def _client_tls(files: dict[str, str], certificate_in: Path | None = None) -> ssl.SSLContext:
    """A client trusting the server's CA; with `certificate_in`, presenting 'proxy-a'."""
    context = ssl.create_default_context(cafile=files["tls_client_ca_file"])
    context.check_hostname = False
    if certificate_in is not None:
        context.load_cert_chain(
            str(certificate_in / "proxy.pem"), str(certificate_in / "proxy.key")
        )
    return context


async def test_the_http_endpoint_with_mutual_tls_refuses_a_caller_without_a_certificate(
    settings: Settings, tmp_path: Path
) -> None:
    files = _pki(tmp_path)
    secured = with_settings(settings, http_authz_listen="127.0.0.1:0", **files)
    async with serving(secured) as (_, listening):
        url = f"https://127.0.0.1:{listening.http_authz_port}/authorize"
        with pytest.raises(aiohttp.ClientError):
            await _get(url, {}, ssl=_client_tls(files))
        proxy = _client_tls(files, tmp_path)
        status, answer = await _get(url, {"x-request-id": rid()}, ssl=proxy)
        # Reached the gate: a request naming no account is refused by it, not by TLS.
        assert (status, answer["x-balance-gate-code"]) == (403, "invalid_request")


async def test_proxy_identities_limit_what_a_certificate_may_debit_over_http(
    settings: Settings, tmp_path: Path
) -> None:
    """The same rule as on the gate port: a listed proxy debits only its account prefixes."""
    files = _pki(tmp_path)
    secured = with_settings(
        settings,
        http_authz_listen="127.0.0.1:0",
        proxy_identities={"proxy-a": ["acme-"]},
        **files,
    )
    async with serving(secured) as (sidecar, listening):
        await fund(sidecar.app, "acme-1", CENT)
        await fund(sidecar.app, "victim", CENT)
        url = f"https://127.0.0.1:{listening.http_authz_port}/authorize"
        proxy = _client_tls(files, tmp_path)
        for account_id, expected in (("victim", (403, "permission_denied")), ("acme-1", None)):
            headers = {
                "x-balance-account": account_id,
                "x-request-id": rid(),
                "x-balance-cost-micros": str(CENT),
            }
            status, answer = await _get(url, headers, ssl=proxy)
            if expected is None:
                assert status == 200
            else:
                assert (status, answer["x-balance-gate-code"]) == expected
        victim = await sidecar.app.hot.read_account("victim")
        assert victim is not None
        assert victim.balance_micros == CENT
