"""deploy/kubernetes, checked without a cluster (there is none here): every manifest
parses, has a known kind and apiVersion and its required fields, and the pieces refer to
each other correctly (probe ports, Secret keys, Service and ServiceMonitor selectors).
"""

from __future__ import annotations

from typing import Any

import pytest

from balance_gate.cli import build_parser
from balance_gate.settings import Settings, is_loopback, split_host_port
from tests.deploy.manifests import DEPLOY, load_all, run_tool, sidecar_settings

API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "Secret": "v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    """Every object of every manifest, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in load_all(path):
            kind = document["kind"]
            assert document["apiVersion"] == API_VERSIONS[kind], path
            assert document["metadata"]["name"], path
            assert kind not in found, f"a second {kind} in {path}"
            found[kind] = document
    assert set(found) == set(API_VERSIONS)
    return found


def _pod(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    template: dict[str, Any] = objects["Deployment"]["spec"]["template"]
    return template


def _gate(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (gate,) = [c for c in _pod(objects)["spec"]["containers"] if c["name"] == "balance-gate"]
    assert isinstance(gate, dict)
    return gate


def test_the_gate_runs_next_to_a_proxy_with_resources(objects: dict[str, Any]) -> None:
    deployment = objects["Deployment"]
    labels = _pod(objects)["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    containers = _pod(objects)["spec"]["containers"]
    assert {c["name"] for c in containers} == {"proxy", "balance-gate"}
    for container in containers:
        assert container["image"], container["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
        assert "memory" in resources["limits"], container["name"]
    assert build_parser().parse_args(_gate(objects)["args"]).func.__name__ == "cmd_serve"


def test_probes_run_the_healthcheck_and_only_metrics_leaves_the_pod(
    objects: dict[str, Any],
) -> None:
    """The gate, HTTP and admin listeners stay on the Pod's loopback (issue 12: they
    believe their callers), so the kubelet, which dials the Pod IP, cannot probe them:
    the probes run `balance-gate healthcheck` inside the container instead."""
    gate = _gate(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = gate[probe]["exec"]["command"]
        assert command[0] == "balance-gate", probe
        assert build_parser().parse_args(command[1:]).func.__name__ == "cmd_healthcheck"
        assert gate[probe]["timeoutSeconds"] > float(command[command.index("--timeout") + 1])
    settings = _settings(objects)
    assert settings.http_authz_listen
    on_loopback = (settings.gate_listen, settings.http_authz_listen, settings.admin_listen)
    for address in on_loopback:
        assert is_loopback(split_host_port(address)[0]), address
    metrics_host, metrics_port = split_host_port(settings.metrics_listen)
    assert metrics_host == "0.0.0.0"
    assert {p["containerPort"] for p in gate["ports"]} == {metrics_port}


def _settings(objects: dict[str, Any]) -> Settings:
    env = _gate(objects)["env"]
    secret = objects["Secret"]
    values: dict[str, str] = {}
    for variable in env:
        if "valueFrom" in variable:
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            values[variable["name"]] = secret["stringData"][ref["key"]]
        else:
            values[variable["name"]] = variable["value"]
    return sidecar_settings(values)


def test_the_env_is_valid_settings_and_the_admin_token_comes_from_the_secret(
    objects: dict[str, Any],
) -> None:
    settings = _settings(objects)
    assert settings.admin_token_values
    gate = _gate(objects)
    (mount,) = gate["volumeMounts"]
    token_file = next(
        v["value"] for v in gate["env"] if v["name"] == "BALANCE_GATE_ADMIN_TOKEN_FILE"
    )
    (volume,) = [v for v in _pod(objects)["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == objects["Secret"]["metadata"]["name"]
    (item,) = volume["secret"]["items"]
    assert item["key"] in objects["Secret"]["stringData"]
    assert token_file == f"{mount['mountPath']}/{item['path']}"
    grace_s = _pod(objects)["spec"]["terminationGracePeriodSeconds"]
    assert grace_s * 1000 > settings.shutdown_grace_ms
    assert _pod(objects)["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_service_monitor_scrapes_the_metrics_port(objects: dict[str, Any]) -> None:
    service, monitor = objects["Service"], objects["ServiceMonitor"]
    pod_labels = _pod(objects)["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in _gate(objects)["ports"]}
    assert port["port"] == _settings(objects).metrics_address[1]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    # The job label the rules of deploy/prometheus/alerts.yml expect.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "balance-gate"


def test_the_manifests_follow_the_kubernetes_api_schemas() -> None:
    """kubernetes-validate --strict (schemas shipped in the package, no cluster). It has
    no schema for the ServiceMonitor CRD: that one is only checked by the tests above."""
    manifests = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    output = run_tool("kubernetes-validate", "--strict", *manifests)
    assert output.count(" passed for resource ") == len(API_VERSIONS) - 1
    assert "Couldn't find schema for kind ServiceMonitor" in output
