"""deploy/grafana/balance-gate.json reads only metrics the sidecar exports. Grafana itself
is not installed here: the dashboard's JSON is checked, not rendered."""

from __future__ import annotations

import json
from typing import Any

from tests.deploy.conftest import Exercised, metric_names_in
from tests.deploy.manifests import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "balance-gate.json"


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            expressions.append(variable["definition"])
    return expressions


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "balance-gate"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "Authorize decisions by code",
        "Authorize latency",
        "Auto top-ups by result",
        "Flush lag",
        "Usage backlog",
        "Circuit breaker",
    ):
        assert wanted in titles
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_metric_the_dashboard_queries_is_exported(exercised: Exercised) -> None:
    used = set().union(*map(metric_names_in, _expressions(json.loads(DASHBOARD.read_text()))))
    assert "balance_gate_authorize_duration_seconds_bucket" in used
    assert len(used) >= 20
    assert used - exercised.sample_names() == set()
    # The series of a plain Authorize, a denial and a Settle are there, not only declared.
    for sample in (
        'balance_gate_authorize_total{result="allowed"}',
        'balance_gate_authorize_total{result="insufficient_balance"}',
        'balance_gate_settle_total{result="settled"}',
        "balance_gate_authorize_duration_seconds_bucket{",
    ):
        assert sample in exercised.scrape, sample
