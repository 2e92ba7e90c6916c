"""`make bench` in miniature (about 20 s), so the benchmark cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_run_measures_gate_and_limits(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    table = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, table
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {run["name"]: run for run in results["runs"]}
    for name in ("gate unary w1", "noop unary w1", "gate stream w1", "noop stream w1"):
        assert runs[name]["calls"] > 0, table
        assert runs[name]["errors"] == 0, table
        assert runs[name]["denied"] == 0, table  # funded: every call is a real debit
        assert runs[name]["server_cpu_us_per_call"] > 0, table
    assert results["summary"]["unary_throughput_vs_noop_w1"] > 0
    assert results["redis_benchmark"]["unpipelined"]["rps"] > 0
    # redis-benchmark ran the real debit, not an early return on a missing account.
    assert results["redis_benchmark"]["debited_share"] > 0.9
    assert (tmp_path / "latency-vs-load.png").stat().st_size > 10_000
