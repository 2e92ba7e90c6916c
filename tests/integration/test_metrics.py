"""Prometheus metrics: counted by result, timed, and never labelled per account."""

from __future__ import annotations

import asyncio
import re

from balance_gate.v1 import gate_pb2
from tests.conftest import RunningGate
from tests.helpers import authorize_request, fund_over_grpc, scrape_metrics


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_authorize_outcomes_are_counted_and_timed(running: RunningGate) -> None:
    port = running.listening.metrics_port
    before = await asyncio.to_thread(scrape_metrics, port)
    await fund_over_grpc(running.admin, "metered", 250_000)
    for _ in range(3):  # 100k, 100k allowed; the third is denied
        await running.gate.Authorize(authorize_request("metered", 100_000))
    settle = authorize_request("metered", 0)
    await running.gate.Authorize(settle)
    await running.gate.Settle(
        gate_pb2.SettleRequest(account_id="metered", request_id=settle.request_id, amount_micros=1)
    )
    after = await asyncio.to_thread(scrape_metrics, port)

    def grew(sample: str) -> float:
        return _value(after, sample) - _value(before, sample)

    assert grew('balance_gate_authorize_total{result="allowed"}') == 3
    assert grew('balance_gate_authorize_total{result="insufficient_balance"}') == 1
    assert grew("balance_gate_authorize_duration_seconds_count") == 4
    assert grew('balance_gate_settle_total{result="settled"}') == 1
    for gauge in ("balance_gate_usage_backlog_events", "balance_gate_usage_flush_lag_seconds"):
        assert re.search(rf"^{gauge} ", after, re.MULTILINE), gauge
    assert "process_cpu_seconds_total" in after
    label_names = set(re.findall(r'[{,](\w+)="', after))
    assert label_names, "no labels scraped"
    assert not {name for name in label_names if "account" in name or "request" in name}
