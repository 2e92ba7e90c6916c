"""The README's settings table lists every setting, so a new one cannot go undocumented."""

from __future__ import annotations

import re
from pathlib import Path

from balance_gate.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    rows = set(re.findall(r"^\| `BALANCE_GATE_([A-Z0-9_]+)` \|", README.read_text(), re.MULTILINE))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - rows == set(), "settings missing from the README table"
    assert rows - fields == set(), "README rows for settings that do not exist"
