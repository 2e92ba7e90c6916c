"""deploy/compose and deploy/docker, checked without a Docker engine (there is none here).

What these tests cannot show: that the images build and the stack starts. They check
that every YAML file parses, that the compose file is whole (services, health checks,
volumes, secrets, files it mounts), that the sidecar's environment is a valid Settings,
and that the Dockerfile is multi-stage, runs as a non-root user with a gRPC health check,
and passes hadolint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from balance_gate.cli import build_parser
from balance_gate.settings import is_loopback, split_host_port
from tests.deploy.manifests import (
    DEPLOY,
    ROOT,
    load_all,
    load_one,
    run_tool,
    sidecar_settings,
    yaml_files,
)

COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_one(COMPOSE)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_under_deploy_parses(path: Path) -> None:
    assert load_all(path), f"{path} holds no document"


def test_the_stack_has_its_five_services_each_with_a_health_check(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {
        "redis",
        "postgres",
        "balance-gate",
        "proxy",
        "prometheus",
        "grafana",
    }
    for name, service in services.items():
        assert "image" in service, name
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        assert len(test) > 1, name
        assert service.get("restart") == "unless-stopped", name


def test_redis_keeps_its_data_and_never_evicts(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options == {
        "--appendonly": "yes",
        "--appendfsync": "everysec",
        "--maxmemory-policy": "noeviction",
    }


def test_volumes_secrets_and_mounted_files_exist(compose: dict[str, Any]) -> None:
    base = COMPOSE.parent
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (base / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: undeclared secret {secret}"
        for dependency, condition in _depends_on(service).items():
            assert dependency in compose["services"], name
            if condition != "service_started":
                assert condition == "service_healthy", name
    build = compose["services"]["balance-gate"]["build"]
    assert (base / build["context"]).resolve() == ROOT
    assert (base / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec["condition"] for name, spec in depends.items()}


def test_the_sidecar_env_is_a_valid_settings_with_an_admin_token(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["balance-gate"]
    settings = sidecar_settings(service["environment"])
    assert settings.admin_token_values, "admin port off loopback needs a token"
    token_file = service["environment"]["BALANCE_GATE_ADMIN_TOKEN_FILE"]
    assert token_file == f"/run/secrets/{service['secrets'][0]}"
    assert settings.redis_url.get_secret_value().startswith("redis://redis:")
    assert "@postgres:" in settings.database_url.get_secret_value()
    assert settings.metrics_address[1] == 9464
    assert _seconds(service["stop_grace_period"]) * 1000 > settings.shutdown_grace_ms
    # The health check is a command the CLI knows.
    assert service["healthcheck"]["test"][1] == "balance-gate"
    build_parser().parse_args(service["healthcheck"]["test"][2:])


def test_only_the_proxy_in_the_sidecars_namespace_reaches_the_gate(
    compose: dict[str, Any],
) -> None:
    """Issue 12: the gate and HTTP endpoint believe their callers, so they listen on the
    loopback of a namespace the proxy shares, and only the proxy's port is published."""
    gate, proxy = compose["services"]["balance-gate"], compose["services"]["proxy"]
    settings = sidecar_settings(gate["environment"])
    assert settings.http_authz_listen
    for address in (settings.gate_listen, settings.http_authz_listen, settings.admin_listen):
        assert is_loopback(split_host_port(address)[0]), address
    assert proxy["network_mode"] == "service:balance-gate"
    assert _depends_on(proxy) == {"balance-gate": "service_healthy"}
    assert gate["ports"] == ["127.0.0.1:8000:8000"]
    assert "../nginx/balance-gate.conf:/etc/nginx/balance-gate.conf:ro" in proxy["volumes"]
    # The shipped file listens where nginx in the shared namespace is reached.
    nginx = (DEPLOY / "nginx" / "balance-gate.conf").read_text()
    assert "listen 127.0.0.1:8000;" in nginx
    assert "sed 's/listen 127.0.0.1:8000;/listen 8000;/'" in proxy["command"][2]
    assert f"127.0.0.1:{settings.http_authz_listen.rsplit(':', 1)[1]};" in nginx


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


def test_prometheus_and_grafana_are_wired_to_each_other(compose: dict[str, Any]) -> None:
    prometheus = load_one(DEPLOY / "prometheus" / "prometheus.yml")
    assert prometheus["rule_files"] == ["alerts.yml"]
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "balance-gate"
    assert job["static_configs"][0]["targets"] == ["balance-gate:9464"]

    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load_one(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_one(provisioning / "dashboards" / "balance-gate.yml")["providers"]
    grafana_mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/balance-gate.json:{provider['options']['path']}/balance-gate.json:ro" in (
        grafana_mounts
    )
    dashboard = json.loads((DEPLOY / "grafana" / "balance-gate.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == datasource["uid"]


def _stages(text: str) -> list[tuple[str, list[str]]]:
    """(stage name, instructions) of each FROM ... AS name, continuation lines joined."""
    stages: list[tuple[str, list[str]]] = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.fullmatch(r"FROM \S+ AS (\S+)", line):
            stages.append((match.group(1), []))
        else:
            stages[-1][1].append(line)
    return stages


def test_the_dockerfile_builds_a_wheel_then_runs_it_as_a_non_root_user() -> None:
    stages = _stages(DOCKERFILE.read_text())
    assert [name for name, _ in stages] == ["build", "runtime"]
    build, runtime = stages[0][1], stages[1][1]
    assert any("python -m build --wheel" in line for line in build)
    assert any(line.startswith("COPY --from=build /wheels") for line in runtime)
    (user,) = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert user.split(":")[0] not in ("root", "0")
    (health,) = [line for line in runtime if line.startswith("HEALTHCHECK ")]
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[0] == "balance-gate"
    assert build_parser().parse_args(command[1:]).func.__name__ == "cmd_healthcheck"
    assert json.loads(next(x for x in runtime if x.startswith("CMD "))[4:]) == ["serve"]


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    run_tool("hadolint", "--no-color", str(DOCKERFILE))


def test_the_compose_file_follows_the_compose_specification() -> None:
    run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
