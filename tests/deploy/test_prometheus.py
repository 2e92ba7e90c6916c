"""deploy/prometheus with Debian's promtool and prometheus (scripts/install-system-deps.sh)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from balance_gate.devservers import free_port
from tests.deploy.conftest import Exercised, metric_names_in
from tests.deploy.manifests import DEPLOY, load_one
from tests.helpers import authorize_request, fund_over_grpc, scrape_metrics

PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: `make deps` installs Debian's prometheus package"
    return path


def _promtool(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [_tool("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        cwd=PROMETHEUS_DIR,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_the_rules_and_the_config() -> None:
    assert "SUCCESS: 11 rules found" in _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")


def test_every_alert_fires_and_stays_quiet_in_its_promtool_unit_test() -> None:
    rules = load_one(ALERTS)["groups"][0]["rules"]
    tests = load_one(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
    for rule in rules:
        cases = [c for t in tests for c in t["alert_rule_test"] if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in cases), f"{rule['alert']} never fires"
        assert any(not c["exp_alerts"] for c in cases), f"{rule['alert']} never stays quiet"
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def test_promtool_check_metrics_accepts_a_scrape_of_the_sidecar(exercised: Exercised) -> None:
    _promtool("check", "metrics", stdin=exercised.scrape)


def test_every_metric_the_alerts_use_is_exported(exercised: Exercised) -> None:
    used = set().union(
        *(metric_names_in(r["expr"]) for r in load_one(ALERTS)["groups"][0]["rules"])
    )
    assert len(used) >= 9
    assert used - exercised.sample_names() == set()


@pytest.fixture
def prometheus(tmp_path: Path, exercised: Exercised) -> Iterator[str]:
    """A real Prometheus on a free port, with deploy/prometheus's config and rules,
    scraping the exercised sidecar every second; yields its base URL."""
    config = load_one(PROMETHEUS_DIR / "prometheus.yml")
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    port = exercised.running.listening.metrics_port
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    address = f"127.0.0.1:{free_port()}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode in (0, -15), (tmp_path / "prometheus.log").read_text()[-3000:]


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]


def _sample(scrape: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", scrape, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_a_real_prometheus_scrapes_the_authorize_counter(
    exercised: Exercised, prometheus: str
) -> None:
    running = exercised.running
    await fund_over_grpc(running.admin, "scraped", 1_000_000)
    for _ in range(3):
        assert (await running.gate.Authorize(authorize_request("scraped", 1_000))).allowed
    # The registry is the process's: earlier tests counted too. Prometheus must end up
    # with exactly what the sidecar exports now (nothing else calls it meanwhile).
    scrape = await asyncio.to_thread(scrape_metrics, running.listening.metrics_port)
    sample = 'balance_gate_authorize_total{result="allowed"}'
    expected = _sample(scrape, sample)
    assert expected - _sample(exercised.scrape, sample) == 3

    def scraped_and_evaluated() -> bool:
        values = [float(s["value"][1]) for s in _api(prometheus, "query", query=sample)["result"]]
        # Every rule of alerts.yml loaded and evaluated without error.
        groups = _api(prometheus, "rules")["groups"]
        healthy = [rule["health"] for group in groups for rule in group["rules"]] == ["ok"] * 11
        return values == [expected] and healthy

    deadline = time.monotonic() + 30
    while True:
        try:
            if await asyncio.to_thread(scraped_and_evaluated):
                return
        except OSError:  # not listening yet
            pass
        assert time.monotonic() < deadline, f"Prometheus never showed {sample} {expected}"
        await asyncio.sleep(0.2)
