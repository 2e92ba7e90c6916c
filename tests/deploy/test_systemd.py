"""deploy/systemd/balance-gate.service: systemd's own checks, plus what the gate needs."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from balance_gate.settings import Settings
from tests.deploy.manifests import DEPLOY, sidecar_settings

UNIT = DEPLOY / "systemd" / "balance-gate.service"
INSTALLED_BIN = "/opt/balance-gate/.venv/bin"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_the_unit_restarts_drains_and_is_hardened() -> None:
    service = _service()
    assert service["EnvironmentFile"] == "/etc/balance-gate/env"
    assert service["ExecStart"] == f"{INSTALLED_BIN}/balance-gate serve"
    assert service["ExecStartPre"] == f"{INSTALLED_BIN}/balance-gate migrate"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    grace_ms = Settings.model_fields["shutdown_grace_ms"].default
    assert int(service["TimeoutStopSec"]) * 1000 >= 3 * grace_ms
    assert service["User"] != "root"
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert service[option] == "true", option
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with its commands pointed at this checkout's virtualenv: `verify`
    checks that they exist, and /opt/balance-gate is not installed here."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(Path(sys.executable).parent)))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(_verifiable_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    # verify exits 0 on unknown keys too, with a warning: any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_rates_the_exposure_ok(tmp_path: Path) -> None:
    unit = str(_verifiable_copy(tmp_path))
    result = subprocess.run(
        # Exposure 0.0 (best) .. 10.0, threshold in tenths; this unit rates 1.7, "OK".
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", unit],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_the_example_environment_file_names_real_settings() -> None:
    """deploy/balance-gate.env.example, the unit's EnvironmentFile: the active lines are a
    valid Settings; the commented-out ones at least name real settings."""
    lines = (DEPLOY / "balance-gate.env.example").read_text().splitlines()
    active = dict(line.split("=", 1) for line in lines if re.match(r"BALANCE_GATE_\w+=", line))
    sidecar_settings(active)
    commented = [line[1:].split("=")[0] for line in lines if re.match(r"#BALANCE_GATE_\w+=", line)]
    assert len(active) >= 5
    assert len(commented) >= 5
    for name in commented:
        assert name.removeprefix("BALANCE_GATE_").lower() in Settings.model_fields, name
