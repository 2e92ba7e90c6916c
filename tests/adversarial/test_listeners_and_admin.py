"""Issue 12 items 2 and 4: no listener open to the network by accident, no open admin.

A listener another host can reach starts only with what stops a caller from lying:
the gate port with mutual TLS, the HTTP endpoint with TLS plus a client CA or the
proxy secret, the admin port with TLS and a token. A token setting that yields no
token, or a token someone meant to replace, refuses to start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from balance_gate.settings import Settings
from tests.conftest import serving
from tests.helpers import CertificateAuthority, tls_files, with_settings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "adversarial-admin-token-0123456789"
OPEN = ("0.0.0.0", "[::]", "10.1.2.3", "gate.internal")


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, str]:
    return tls_files(tmp_path, CertificateAuthority("listener test CA"))


@pytest.mark.parametrize("host", OPEN)
def test_a_plaintext_gate_port_off_loopback_refuses_to_start(
    settings: Settings, tls: dict[str, str], host: str
) -> None:
    """Before: the Dockerfile served 0.0.0.0:50051 in plaintext, where anyone could debit."""
    with pytest.raises(ValidationError, match=r"gate_listen .* needs mutual TLS"):
        with_settings(settings, gate_listen=f"{host}:50051")
    server_tls_only = {k: v for k, v in tls.items() if k != "tls_client_ca_file"}
    with pytest.raises(ValidationError, match=r"gate_listen .* needs mutual TLS"):
        with_settings(settings, gate_listen=f"{host}:50051", **server_tls_only)
    assert with_settings(settings, gate_listen=f"{host}:50051", **tls)


@pytest.mark.parametrize("host", OPEN)
def test_the_http_endpoint_off_loopback_needs_tls_and_a_proxy_proof(
    settings: Settings, tls: dict[str, str], host: str
) -> None:
    address = f"{host}:50080"
    server_tls_only = {k: v for k, v in tls.items() if k != "tls_client_ca_file"}
    with pytest.raises(ValidationError, match="http_authz_listen"):
        with_settings(settings, http_authz_listen=address)
    with pytest.raises(ValidationError, match="http_authz_listen"):
        with_settings(settings, http_authz_listen=address, http_authz_secret="s" * 32)
    with pytest.raises(ValidationError, match="http_authz_listen"):
        with_settings(settings, http_authz_listen=address, **server_tls_only)
    assert with_settings(
        settings, http_authz_listen=address, http_authz_secret="s" * 32, **server_tls_only
    )
    assert with_settings(settings, http_authz_listen=address, **tls)


def test_a_tokened_admin_port_off_loopback_still_needs_tls(
    settings: Settings, tls: dict[str, str]
) -> None:
    with pytest.raises(ValidationError, match=r"admin_listen .* needs TLS"):
        with_settings(settings, admin_listen="0.0.0.0:50052", admin_tokens=TOKEN)
    assert with_settings(settings, admin_listen="0.0.0.0:50052", admin_tokens=TOKEN, **tls)


async def test_allow_insecure_listen_starts_but_warns_at_every_start(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    insecure = with_settings(settings, gate_listen="0.0.0.0:0", allow_insecure_listen=True)
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="balance_gate.server"):
            async with serving(insecure):
                pass
    warnings = [r.getMessage() for r in caplog.records if "ALLOW_INSECURE_LISTEN" in r.getMessage()]
    assert len(warnings) == 2
    assert "gate_listen" in warnings[0]


@pytest.mark.parametrize("tokens", [" , ", ",", " ", ",,, ,"])
def test_an_admin_tokens_setting_without_a_token_refuses_to_start(
    settings: Settings, tokens: str
) -> None:
    """Before: " , " gave no token, and the admin API served anyone on loopback."""
    with pytest.raises(ValidationError, match="admin_tokens is set but holds no token"):
        with_settings(settings, admin_tokens=tokens)


def test_a_token_file_of_only_comments_refuses_to_start(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "admin-tokens"
    path.write_text("# one token per line\n\n# (rotated out)\n")
    with pytest.raises(ValidationError, match=r"admin_token_file .* holds no token"):
        with_settings(settings, admin_token_file=str(path))


def _shipped_placeholder() -> str:
    secret = yaml.safe_load((ROOT / "deploy/kubernetes/secret.yaml").read_text())
    token: str = secret["stringData"]["admin-tokens"].strip()
    return token


@pytest.mark.parametrize(
    "token",
    [
        "REPLACE-ME-with-openssl-rand-base64-32",
        "changeme-changeme-changeme",
        "example-token-0123456789",
        "TODO-put-a-real-token-here",
        "placeholder-0123456789abcdef",
    ],
)
def test_a_placeholder_token_refuses_to_start(
    settings: Settings, tmp_path: Path, token: str
) -> None:
    with pytest.raises(ValidationError, match="looks like a placeholder"):
        with_settings(settings, admin_tokens=token)
    path = tmp_path / "admin-tokens"
    path.write_text(f"{token}\n")
    with pytest.raises(ValidationError, match="looks like a placeholder") as refused:
        with_settings(settings, admin_token_file=str(path))
    assert token not in str(refused.value)  # a token never reaches a message


def test_the_kubernetes_secret_as_shipped_does_not_start(settings: Settings) -> None:
    """Whatever deploy/kubernetes/secret.yaml ships must be replaced before it runs."""
    with pytest.raises(ValidationError, match="placeholder"):
        with_settings(settings, admin_tokens=_shipped_placeholder())
