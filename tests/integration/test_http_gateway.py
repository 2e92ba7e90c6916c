"""The http payment gateway against a real HTTP server on a free port.

The server implements docs/payment-gateway.md and can drop a connection, to
prove that retries reuse the Idempotency-Key and never charge twice.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from balance_gate.devservers import free_port
from balance_gate.http_gateway import HttpGateway
from balance_gate.payments import GatewayRejected, GatewayUnavailable

TOKEN = "test-token"


@dataclass
class PaymentService:
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    drop_next_charges: int = 0
    requests: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/charges", self.charge)
        app.router.add_get("/v1/charges", self.lookup)
        app.router.add_get("/v1/payment_methods/{token}", self.payment_method)
        return app

    def _authorized(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized()

    async def charge(self, request: web.Request) -> web.StreamResponse:
        self._authorized(request)
        self.requests += 1
        key = request.headers["Idempotency-Key"]
        body = await request.json()
        if key not in self.charges:
            declined = body["payment_method"] == "pm_card_declined"
            self.charges[key] = {
                "charge_id": f"ch_{uuid.uuid4().hex[:12]}",
                "status": "declined" if declined else "succeeded",
                "decline_code": "generic_decline" if declined else None,
                "amount_minor": body["amount_minor"],
                "currency": body["currency"],
            }
        if self.drop_next_charges:
            # Charged, then the connection dies before the answer: the client
            # must retry with the same key and get this same charge back.
            self.drop_next_charges -= 1
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        return web.json_response(self.charges[key])

    async def lookup(self, request: web.Request) -> web.Response:
        self._authorized(request)
        found = self.charges.get(request.query["idempotency_key"])
        return web.json_response(found) if found else web.json_response({}, status=404)

    async def payment_method(self, request: web.Request) -> web.Response:
        self._authorized(request)
        currency = "EUR" if request.match_info["token"].endswith("eur") else "USD"
        return web.json_response({"currency": currency})


@pytest.fixture
async def service() -> AsyncIterator[tuple[PaymentService, str]]:
    payments = PaymentService()
    runner = web.AppRunner(payments.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield payments, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_charge_lookup_and_card_currency(service: tuple[PaymentService, str]) -> None:
    payments, url = service
    gateway = HttpGateway(url, TOKEN, timeout_s=2, retries=0)
    try:
        assert await gateway.card_currency("pm_card_eur") == "EUR"
        charge = await gateway.charge("pm_card_visa", 2_000, "USD", "key-1")
        assert (charge.succeeded, charge.amount_minor, charge.currency) == (True, 2_000, "USD")
        declined = await gateway.charge("pm_card_declined", 500, "USD", "key-2")
        assert (declined.succeeded, declined.decline_code) == (False, "generic_decline")
        assert await gateway.lookup("key-1") == charge
        assert await gateway.lookup("never-used") is None
    finally:
        await gateway.close()
    assert sorted(payments.charges) == ["key-1", "key-2"]


async def test_a_dropped_connection_is_retried_with_the_same_key_and_charges_once(
    service: tuple[PaymentService, str],
) -> None:
    payments, url = service
    payments.drop_next_charges = 2
    gateway = HttpGateway(url, TOKEN, timeout_s=2, retries=2, backoff_s=0.01)
    try:
        charge = await gateway.charge("pm_card_visa", 1_500, "USD", "retry-key")
    finally:
        await gateway.close()
    assert charge.succeeded
    assert payments.requests == 3
    assert len(payments.charges) == 1


async def test_retries_give_up_as_unavailable_and_refusals_are_not_retried(
    service: tuple[PaymentService, str],
) -> None:
    payments, url = service
    payments.drop_next_charges = 5
    gateway = HttpGateway(url, TOKEN, timeout_s=2, retries=1, backoff_s=0.01)
    try:
        with pytest.raises(GatewayUnavailable):
            await gateway.charge("pm_card_visa", 100, "USD", "lost")
        assert payments.requests == 2
    finally:
        await gateway.close()
    wrong_token = HttpGateway(url, "wrong", timeout_s=2, retries=3)
    try:
        with pytest.raises(GatewayRejected):
            await wrong_token.charge("pm_card_visa", 100, "USD", "refused")
        assert payments.requests == 2  # a 401 is not retried
    finally:
        await wrong_token.close()
