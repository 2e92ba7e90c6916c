"""A sidecar that has served an allowed and a denied Authorize and a Settle, scraped."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import pytest

from balance_gate.v1 import gate_pb2
from tests.conftest import RunningGate
from tests.helpers import authorize_request, fund_over_grpc, scrape_metrics


@dataclass(frozen=True)
class Exercised:
    running: RunningGate
    scrape: str  # /metrics after the calls

    def sample_names(self) -> set[str]:
        """Every sample name the metric families declare, whether or not a labelled
        series has appeared yet (a histogram is its _bucket, _sum and _count)."""
        names: set[str] = set()
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", self.scrape, re.MULTILINE):
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        return names


@pytest.fixture
async def exercised(running: RunningGate) -> Exercised:
    await fund_over_grpc(running.admin, "deploy-metrics", 150_000)
    allowed = authorize_request("deploy-metrics", 100_000)
    assert (await running.gate.Authorize(allowed)).allowed
    denied = await running.gate.Authorize(authorize_request("deploy-metrics", 100_000))
    assert denied.code == "insufficient_balance"
    await running.gate.Settle(
        gate_pb2.SettleRequest(
            account_id="deploy-metrics", request_id=allowed.request_id, amount_micros=90_000
        )
    )
    text = await asyncio.to_thread(scrape_metrics, running.listening.metrics_port)
    return Exercised(running, text)


def metric_names_in(expression: str) -> set[str]:
    """The balance_gate_* metric names a PromQL expression reads."""
    return set(re.findall(r"\bbalance_gate_[a-z0-9_]+\b", expression))
