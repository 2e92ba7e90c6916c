"""The committed protobuf/gRPC modules must match proto/: stale stubs fail here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "balance_gate" / "v1"


def _generated_files(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.is_file() and p.name != "__init__.py" and p.suffix in (".py", ".pyi")
    }


def test_generated_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    # The mypy-protobuf plugins live beside the interpreter.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    fresh = _generated_files(tmp_path / "balance_gate" / "v1")
    committed = _generated_files(COMMITTED)
    assert fresh, "protoc generated nothing"
    assert sorted(committed) == sorted(fresh), "generated files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make proto`"
