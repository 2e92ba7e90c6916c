"""`balance-gate admin ...` as a child process against a real sidecar's admin port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from balance_gate import admin_cli, cli
from balance_gate.settings import Settings
from tests.conftest import RunningGate, serving
from tests.helpers import USD, mutual_tls_files, with_settings

TOKEN = "cli-token-0123456789abcdef"


@dataclass
class Result:
    code: int
    out: str
    err: str


async def admin(address: str, *args: str, **env: str) -> Result:
    """Run `python -m balance_gate admin <args> --admin <address>` (never blocking the loop)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BALANCE_GATE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "balance_gate",
        "admin",
        *args,
        "--admin",
        address,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def admin_address(running: RunningGate) -> str:
    return f"127.0.0.1:{running.listening.admin_port}"


def row(table: str, name: str) -> str:
    """The value of one row of a field/value table."""
    match = re.search(rf"^{re.escape(name)}\s+(.*)$", table, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{table}"
    return match.group(1)


async def test_an_account_from_creation_to_top_ups(running: RunningGate) -> None:
    address = admin_address(running)
    created = await admin(address, "create-account", "--account-id", "acme", "--currency", "EUR")
    assert created.code == 0, created.err
    assert row(created.out, "currency") == "EUR"
    assert row(created.out, "status") == "active"

    credited = await admin(
        address, "credit", "--account-id", "acme", "--amount", "12.50", "--reason", "wire"
    )
    assert credited.code == 0, credited.err
    assert row(credited.out, "balance") == "12.50"
    # No key given: one was generated and printed, so the retry reuses it.
    key = re.search(r"--idempotency-key (\S+)", credited.err)
    assert key, credited.err
    retried = await admin(
        address,
        "credit",
        "--account-id",
        "acme",
        "--amount-micros",
        "12500000",
        "--reason",
        "wire",
        "--idempotency-key",
        key.group(1),
    )
    assert retried.code == 0, retried.err
    assert retried.err == ""

    got = await admin(address, "get-account", "--account-id", "acme", "--json")
    assert got.code == 0, got.err
    account = json.loads(got.out)
    assert account["balance_micros"] == 12_500_000  # credited once, an exact integer
    assert account["status"] == "ACCOUNT_STATUS_ACTIVE"
    assert account["auto_top_up"] is None  # never configured

    for args in (
        ("set-payment-methods", "--primary", "pm_card_visa"),
        ("set-fx-rates", "--date", "2026-11-25", "--base", "EUR", "--rate", "USD=1.0842"),
        (
            "set-auto-top-up",
            "--enabled",
            "--threshold",
            "5",
            "--amount",
            "20",
            "--daily-cap",
            "100",
        ),
    ):
        if args[0] != "set-fx-rates":
            args = (*args, "--account-id", "acme")
        done = await admin(address, *args)
        assert done.code == 0, (args, done.err)
    auto = json.loads((await admin(address, "get-account", "--account-id", "acme", "--json")).out)
    assert auto["auto_top_up"]["enabled"] is True
    assert auto["auto_top_up"]["daily_cap_micros"] == 100 * USD

    none = await admin(address, "list-top-ups", "--account-id", "acme")
    assert (none.code, none.out.strip()) == (0, "no top ups")
    listed = await admin(address, "list-top-ups", "--account-id", "acme", "--json")
    assert json.loads(listed.out) == {"top_ups": []}


async def test_bad_input_is_a_clean_error_naming_the_field(running: RunningGate) -> None:
    address = admin_address(running)
    too_precise = await admin(
        address, "credit", "--account-id", "acme", "--amount", "1.2345678", "--reason", "x"
    )
    assert too_precise.code == 2
    assert "--amount" in too_precise.err
    assert "at most 6 decimals" in too_precise.err
    assert "Traceback" not in too_precise.err

    empty = await admin(address, "get-account", "--account-id", "")
    assert empty.code == 1
    assert empty.err.strip() == "error: INVALID_ARGUMENT: account_id: must not be empty"

    missing = await admin(address, "get-account", "--account-id", "nobody")
    assert missing.code == 1
    assert missing.err.startswith("error: NOT_FOUND: ")

    unreachable = await admin("127.0.0.1:1", "get-account", "--account-id", "x", "--timeout", "2")
    assert unreachable.code == 1
    assert unreachable.err.startswith("error: UNAVAILABLE: ")


async def test_a_token_protected_admin_api(settings: Settings, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"# ops token\n\n{TOKEN}\n")
    async with serving(with_settings(settings, admin_tokens=TOKEN)) as (_, listening):
        address = f"127.0.0.1:{listening.admin_port}"
        refused = await admin(address, "create-account", "--account-id", "acme")
        assert refused.code == 1
        assert refused.err.startswith("error: UNAUTHENTICATED: ")
        wrong = await admin(address, "get-account", "--account-id", "acme", "--token", "x" * 20)
        assert wrong.err.startswith("error: UNAUTHENTICATED: ")

        created = await admin(address, "create-account", "--account-id", "acme", "--token", TOKEN)
        assert created.code == 0, created.err
        ways: list[tuple[tuple[str, ...], dict[str, str]]] = [
            (("--token-file", str(token_file)), {}),
            ((), {admin_cli.TOKEN_ENV: TOKEN}),
        ]
        for args, env in ways:
            got = await admin(address, "get-account", "--account-id", "acme", *args, **env)
            assert got.code == 0, (args, got.err)
            assert row(got.out, "account_id") == "acme"


async def test_mutual_tls(settings: Settings, tmp_path: Path) -> None:
    files, cert, key = mutual_tls_files(tmp_path, "ops")
    async with serving(with_settings(settings, **files)) as (_, listening):
        address = f"127.0.0.1:{listening.admin_port}"
        tls = ("--cacert", files["tls_client_ca_file"])
        created = await admin(
            address,
            "create-account",
            "--account-id",
            "acme",
            *tls,
            "--cert",
            cert,
            "--key",
            key,
        )
        assert created.code == 0, created.err
        no_cert = await admin(address, "get-account", "--account-id", "acme", *tls)
        assert no_cert.code == 1
        assert no_cert.err.startswith("error: UNAVAILABLE: ")
        half = await admin(address, "get-account", "--account-id", "acme", *tls, "--key", "k")
        assert half.code == 2
        assert "set both" in half.err


def test_every_rpc_has_a_command_with_help(capsys: pytest.CaptureFixture[str]) -> None:
    rpcs = {method.name for method in admin_cli.SERVICE.methods}
    assert rpcs == set(admin_cli.COMMANDS)
    for command in admin_cli.COMMANDS.values():
        with pytest.raises(SystemExit) as exited:
            cli.main(["admin", command.name, "--help"])
        assert exited.value.code == 0, command.name
        text = capsys.readouterr().out
        assert "--admin ADDRESS" in text, command.name
        for field in command.required:
            flag = "--" + field.removesuffix("_micros").replace("_", "-").removesuffix("s")
            assert flag in text, (command.name, flag)
    with pytest.raises(SystemExit) as exited:
        cli.main(["admin", "--help"])
    assert exited.value.code == 0


@pytest.mark.parametrize(
    ("text", "micros"),
    [("12.50", 12_500_000), ("0.000001", 1), ("-3", -3_000_000), ("100000000", 10**14)],
)
def test_amounts_parse_exactly(text: str, micros: int) -> None:
    assert admin_cli.parse_units(text) == micros


@pytest.mark.parametrize("text", ["1.2345678", "1e3", "nan", "12,50", "", "$5", "0x10", "1."])
def test_amounts_that_are_refused(text: str) -> None:
    with pytest.raises(Exception, match="decimal amount"):
        admin_cli.parse_units(text)


def test_amounts_print_exactly() -> None:
    assert admin_cli.format_units(12_500_000) == "12.50"
    assert admin_cli.format_units(7_500) == "0.0075"
    assert admin_cli.format_units(-2_500) == "-0.0025"
    assert admin_cli.format_units(0) == "0.00"
    assert admin_cli.format_units(10**14 + 1) == "100000000.000001"


async def test_a_manual_top_up_its_invoice_and_its_refund(running: RunningGate) -> None:
    address = admin_address(running)
    for args in (
        ("create-account", "--account-id", "beta"),
        ("set-payment-methods", "--account-id", "beta", "--primary", "pm_card_visa"),
    ):
        done = await admin(address, *args)
        assert done.code == 0, (args, done.err)
    topped = await admin(
        address, "top-up", "--account-id", "beta", "--amount", "20", "--idempotency-key", "t-1"
    )
    assert topped.code == 0, topped.err
    assert row(topped.out, "status") == "succeeded"
    assert row(topped.out, "credited") == "20.00"

    listed = await admin(address, "list-top-ups", "--account-id", "beta")
    header, first = listed.out.splitlines()
    assert header.split()[:4] == ["top_up_id", "account_id", "kind", "status"]
    assert first.split()[1:4] == ["beta", "manual", "succeeded"]
    top_up_id = first.split()[0]
    invoices = json.loads(
        (await admin(address, "list-invoices", "--account-id", "beta", "--json")).out
    )["invoices"]
    assert [i["amount_minor"] for i in invoices] == [2_000]

    refunded = await admin(
        address, "refund-top-up", "--top-up-id", top_up_id, "--amount", "5", "--reason", "goodwill"
    )
    assert refunded.code == 0, refunded.err
    assert row(refunded.out, "refunded") == "5.00"
    assert "idempotency key: cli-" in refunded.err
