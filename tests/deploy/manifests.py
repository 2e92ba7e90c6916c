"""What the tests of deploy/ share: the files, YAML loading, and checks of sidecar env."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from balance_gate.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PREFIX = "BALANCE_GATE_"
# A token the settings accept, for files the manifests mount as the admin token file.
TEST_TOKEN = "deploy-test-token-0123456789"


def run_tool(name: str, *args: str) -> str:
    """Run a command-line tool of this virtualenv's dev extras; fail with its output."""
    tool = Path(sys.executable).parent / name
    result = subprocess.run([str(tool), *args], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def load_all(path: Path) -> list[Any]:
    """Every YAML document of `path` (empty documents dropped)."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    (document,) = load_all(path)
    assert isinstance(document, dict), path
    return document


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def sidecar_settings(env: Mapping[str, str]) -> Settings:
    """The Settings a sidecar with environment `env` would run with.

    Every name must be a real setting. The admin token file the manifest mounts does
    not exist here, so it is replaced by a temporary one holding a valid token; the
    other values are validated as they are written (compose's ${VAR:?...} becomes "x").
    """
    values: dict[str, str] = {}
    for name, value in env.items():
        assert name.startswith(PREFIX), f"{name}: not a BALANCE_GATE_ setting"
        field = name.removeprefix(PREFIX).lower()
        assert field in Settings.model_fields, f"{name}: no such setting"
        values[field] = re.sub(r"\$\{[^}]*\}", "x", value)
    with tempfile.TemporaryDirectory() as directory:
        if "admin_token_file" in values:
            token_file = Path(directory) / "admin-tokens"
            token_file.write_text(TEST_TOKEN + "\n")
            values["admin_token_file"] = str(token_file)
        # Validating reads the token file: an admin listener off loopback needs a token.
        return Settings.model_validate(values)
