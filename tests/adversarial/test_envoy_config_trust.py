"""Issue 12 item 2: through deploy/envoy/envoy.yaml, a client cannot choose its account,
its price or its request id.

Envoy is not installable here, so the test does what that file tells Envoy to do,
read from the file itself: the first filter's Lua list of headers to remove, the
jwt_authn claim that becomes the account, a request id generated per request, and
the matched route's context_extensions. The CheckRequests built that way go to a
real sidecar, with every header a client could forge set to lie.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.conftest import RunningGate
from tests.helpers import USD, fund, ledger_balance, wait_until_flushed

CONFIG = Path(__file__).resolve().parents[2] / "deploy/envoy/envoy.yaml"
GATE_HEADERS = {"x-balance-account", "x-balance-cost-micros", "x-balance-capability"}


def _connection_manager() -> dict[str, Any]:
    bootstrap = yaml.safe_load(CONFIG.read_text())
    listener = bootstrap["static_resources"]["listeners"][0]
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def _filter(manager: dict[str, Any], name: str) -> dict[str, Any]:
    config: dict[str, Any] = next(
        f["typed_config"] for f in manager["http_filters"] if f["name"] == name
    )
    return config


class EnvoyModel:
    """What envoy.yaml makes Envoy send to the gate for one client request."""

    def __init__(self) -> None:
        manager = self.manager = _connection_manager()
        names = [f["name"] for f in manager["http_filters"]]
        lua = _filter(manager, "envoy.filters.http.lua")["default_source_code"]["inline_string"]
        self.removed = set(re.findall(r'"([a-z0-9-]+)"', lua.split("function")[0]))
        claims = _filter(manager, "envoy.filters.http.jwt_authn")["providers"]["customers"]
        self.account_header = claims["claim_to_headers"][0]["header_name"]
        # The order matters: strip, then authenticate, then ask the gate.
        assert names.index("envoy.filters.http.lua") < names.index("envoy.filters.http.jwt_authn")
        assert names.index("envoy.filters.http.jwt_authn") < names.index(
            "envoy.filters.http.ext_authz"
        )
        self.routes = manager["route_config"]["virtual_hosts"][0]["routes"]

    def check_request(self, path: str, client_headers: dict[str, str], subject: str) -> Any:
        headers = {k: v for k, v in client_headers.items() if k not in self.removed}
        headers[self.account_header] = subject  # jwt_authn, from the verified token
        headers["x-request-id"] = str(uuid.uuid4())  # generated; the client's is replaced
        route = next(r for r in self.routes if path.startswith(r["match"]["prefix"]))
        per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
        request = external_auth_pb2.CheckRequest()
        request.attributes.request.http.headers.update(headers)
        request.attributes.request.http.path = path
        request.attributes.context_extensions.update(
            per_route["check_settings"]["context_extensions"]
        )
        return request


def test_the_config_generates_request_ids_and_strips_every_gate_header() -> None:
    model = EnvoyModel()
    manager = model.manager
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is False
    assert manager["use_remote_address"] is True
    assert model.removed >= GATE_HEADERS
    assert model.account_header == "x-balance-account"
    assert _filter(manager, "envoy.filters.http.ext_authz")["failure_mode_allow"] is False
    for route in model.routes:  # every route names its price
        per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
        cost = per_route["check_settings"]["context_extensions"]["x-balance-cost-micros"]
        assert re.fullmatch(r"[0-9]+", cost)


async def test_a_lying_client_pays_the_route_price_from_its_own_account(
    running: RunningGate,
) -> None:
    model = EnvoyModel()
    await fund(running.app, "customer", USD)
    await fund(running.app, "victim", USD)
    forged = {
        "x-balance-account": "victim",
        "x-balance-cost-micros": "0",
        "x-balance-capability": "free",
        "x-request-id": "the-same-id-every-time",
    }
    stub = external_auth_pb2_grpc.AuthorizationStub(running.gate_channel)
    prices = []
    for path in ("/v1/chat/completions", "/v1/chat/completions", "/images", "/images"):
        request = model.check_request(path, forged, subject="customer")
        answer = await stub.Check(request)
        assert answer.status.code == 0, answer
        prices.append(int(request.attributes.context_extensions["x-balance-cost-micros"]))
    await wait_until_flushed(running.app)
    assert await ledger_balance(running.app, "customer") == USD - sum(prices)
    assert await ledger_balance(running.app, "victim") == USD
    capabilities = await running.app.pool.fetch(
        "SELECT capability FROM usage_events WHERE account_id = 'customer' ORDER BY capability"
    )
    assert [r["capability"] for r in capabilities] == ["", "", "chat", "chat"]
