"""The `http` payment gateway: a payment service spoken to in JSON over HTTP.

The contract is in docs/payment-gateway.md. Every charge carries an
`Idempotency-Key` header; only network errors (no connection, timeout, the
connection dropped) are retried, with the same key, so a retry never charges
twice. Any other unexpected answer is an error, not a guess.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from balance_gate.payments import Charge, GatewayRejected, GatewayUnavailable, Refund, mask

log = logging.getLogger(__name__)


class HttpGateway:
    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 5.0,
        retries: int = 2,
        backoff_s: float = 0.1,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        self._backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def card_currency(self, payment_method: str) -> str:
        body = await self._call("GET", f"/v1/payment_methods/{payment_method}")
        assert body is not None
        return str(body["currency"])

    async def charge(
        self, payment_method: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> Charge:
        body = await self._call(
            "POST",
            "/v1/charges",
            json={
                "payment_method": payment_method,
                "amount_minor": amount_minor,
                "currency": currency,
            },
            headers={"Idempotency-Key": idempotency_key},
        )
        assert body is not None
        log.info("charged %s: %s", mask(payment_method), body.get("status"))
        return _charge(body)

    async def lookup(self, idempotency_key: str) -> Charge | None:
        body = await self._call(
            "GET", "/v1/charges", params={"idempotency_key": idempotency_key}, missing_ok=True
        )
        return None if body is None else _charge(body)

    async def refund(
        self, charge_id: str, amount_minor: int, currency: str, idempotency_key: str
    ) -> Refund:
        body = await self._call(
            "POST",
            "/v1/refunds",
            json={"charge_id": charge_id, "amount_minor": amount_minor, "currency": currency},
            headers={"Idempotency-Key": idempotency_key},
        )
        assert body is not None
        return Refund(str(body["refund_id"]), int(body["amount_minor"]), str(body["currency"]))

    async def _call(
        self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any
    ) -> dict[str, Any] | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        headers = kwargs.pop("headers", {})
        for attempt in range(self._retries + 1):
            try:
                async with self._session.request(
                    method, self._base_url + path, headers=headers, **kwargs
                ) as response:
                    if response.status == 404 and missing_ok:
                        return None
                    if response.status >= 500:
                        raise GatewayUnavailable(f"payment service answered {response.status}")
                    if response.status >= 400:
                        raise GatewayRejected(f"{method} {path}: {response.status}")
                    body: dict[str, Any] = await response.json()
                    return body
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if attempt == self._retries:
                    raise GatewayUnavailable(f"{method} {path}: {exc!r}") from exc
                await asyncio.sleep(self._backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _charge(body: dict[str, Any]) -> Charge:
    status = body["status"]
    if status not in ("succeeded", "declined"):
        raise GatewayUnavailable(f"unexpected charge status {status!r}")
    return Charge(
        charge_id=str(body["charge_id"]),
        succeeded=status == "succeeded",
        decline_code=body.get("decline_code"),
        amount_minor=int(body["amount_minor"]),
        currency=str(body["currency"]),
    )
