"""Top-ups (P3..P5, O1, O3): configuration, manual top-ups, and charging a card.

A top-up is a row before it is a charge: the row (with its idempotency key)
is committed first, then the gateway is charged with a key derived from the
row, then the outcome is recorded; on success the credit, the invoice and the
status change commit together and the credit reaches Redis exactly once. A
crash anywhere leaves a pending row that is resolved by charging again with the
same key, which the gateway answers with the first outcome.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable
from decimal import ROUND_CEILING, ROUND_FLOOR
from zoneinfo import ZoneInfo

from balance_gate import metrics, money, validation
from balance_gate.accounts import Accounts
from balance_gate.constants import MAX_CREDIT_MICROS
from balance_gate.errors import FailedPrecondition, InvalidArgument, Unavailable
from balance_gate.fx import Conversion, FxRates, convert
from balance_gate.keys import shard_of
from balance_gate.payments import GatewayRejected, GatewayUnavailable, PaymentGateway, mask
from balance_gate.postgres_store import PostgresStore
from balance_gate.redis_store import RedisStore
from balance_gate.top_up_store import (
    AutoTopUpRow,
    Billing,
    Charged,
    InvoiceRow,
    MonthlyReport,
    TopUpRow,
    TopUpStore,
)

log = logging.getLogger(__name__)

# Deliberately simple: one @, no spaces or control characters, a dot in the domain.
_EMAIL = re.compile(r"[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+")

# A top-up whose day has no FX rate it needs fails clearly, never guesses (P6).
FX_RATE_MISSING = "fx_rate_missing"
# One top-up worth more than BALANCE_GATE_TOP_UP_MAX_CHARGE_MICROS (a bad rate?).
CHARGE_OVER_LIMIT = "charge_over_limit"


def local_day(time_zone: str, now: dt.datetime | None = None) -> dt.date:
    moment = now or dt.datetime.now(dt.UTC)
    return moment.astimezone(ZoneInfo(time_zone)).date()


class TopUps:
    def __init__(
        self,
        store: TopUpStore,
        pg: PostgresStore,
        hot: RedisStore,
        accounts: Accounts,
        gateway: PaymentGateway,
        rates: FxRates,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        *,
        max_charge_micros: int,
    ) -> None:
        self.clock = clock
        self._max_charge_micros = max_charge_micros
        self._store = store
        self._pg = pg
        self._hot = hot
        self._accounts = accounts
        self.gateway = gateway
        self.rates = rates

    # --- configuration ------------------------------------------------------

    async def set_payment_methods(self, account_id: str, primary: str, backup: str) -> None:
        validation.check_id("account_id", account_id)
        validation.check_id("primary", primary)
        if backup:
            validation.check_id("backup", backup)
        await self._store.set_payment_methods(account_id, primary, backup or None)

    async def set_time_zone(self, account_id: str, time_zone: str) -> None:
        validation.check_id("account_id", account_id)
        validation.check_time_zone(time_zone)
        await self._store.set_time_zone(account_id, time_zone, self.clock())

    async def set_billing_email(self, account_id: str, email: str) -> None:
        validation.check_id("account_id", account_id)
        if not _EMAIL.fullmatch(email):
            raise InvalidArgument("email", "must be an email address like name@example.com")
        await self._store.set_billing_email(account_id, email)

    async def set_auto_top_up(
        self,
        account_id: str,
        enabled: bool,
        threshold_micros: int,
        amount_micros: int,
        daily_cap_micros: int,
        monthly_cap_micros: int,
        target_balance_micros: int = 0,
    ) -> None:
        validation.check_id("account_id", account_id)
        if target_balance_micros and not (
            threshold_micros < target_balance_micros <= MAX_CREDIT_MICROS
        ):
            raise InvalidArgument(
                "target_balance_micros", "must be 0 (fixed amounts) or above threshold_micros"
            )
        billing = await self._store.billing(account_id)
        _check_auto_top_up(
            enabled, threshold_micros, amount_micros, daily_cap_micros, monthly_cap_micros
        )
        money.check_whole_minor_units("amount_micros", amount_micros, billing.currency)
        trigger_usd = await self._trigger_threshold_usd(threshold_micros, billing.currency)
        async with self._pg.shard_lock([shard_of(account_id)], exclusive=False) as conn:
            await self._store.save_auto_top_up(
                conn,
                account_id,
                enabled,
                threshold_micros,
                amount_micros,
                daily_cap_micros,
                monthly_cap_micros or None,
                trigger_usd,
                target_balance_micros or None,
            )
            settings = await self._store.auto_top_up(account_id)
            assert settings is not None
            armed = settings.enabled and not settings.paused
            await self._hot.mark_top_up_capped(account_id, 0)  # new caps: judged anew
            await self._hot.set_auto_top_up(account_id, armed, trigger_usd)
            await self._hot.hold_top_up_trigger(account_id, 0)

    async def pause(self, account_id: str, reason: str) -> None:
        """Pause auto top-up until it is resumed by hand (P11, P14); a no-op without one."""
        async with self._pg.shard_lock([shard_of(account_id)], exclusive=False) as conn:
            if not await self._store.pause(conn, account_id, reason):
                return
            metrics.AUTO_TOP_UPS_PAUSED.labels(reason).inc()
            settings = await self._store.auto_top_up(account_id)
            assert settings is not None
            await self._hot.set_auto_top_up(
                account_id, False, settings.trigger_threshold_usd_micros
            )

    async def resume(self, account_id: str) -> None:
        validation.check_id("account_id", account_id)
        async with self._pg.shard_lock([shard_of(account_id)], exclusive=False) as conn:
            if not await self._store.resume(conn, account_id):
                raise FailedPrecondition(f"account {account_id!r} has no auto top-up settings")
            settings = await self._store.auto_top_up(account_id)
            assert settings is not None
            await self._hot.set_auto_top_up(
                account_id, settings.enabled, settings.trigger_threshold_usd_micros
            )
            await self._hot.hold_top_up_trigger(account_id, 0)

    async def _trigger_threshold_usd(self, threshold_micros: int, currency: str) -> int:
        """The threshold in micro-USD for the debit scripts, at the latest known rate.

        Without any rate the threshold is taken as is: triggers still fire, and
        the worker then stops with fx_rate_missing, which GetAccount shows.
        """
        rate = await self.rates.latest_rate(currency, "USD")
        if rate is None:
            return threshold_micros
        return int((threshold_micros * rate).to_integral_value(rounding=ROUND_CEILING))

    async def billing(self, account_id: str) -> Billing:
        return await self._store.billing(account_id)

    async def auto_top_up(self, account_id: str) -> AutoTopUpRow | None:
        return await self._store.auto_top_up(account_id)

    async def charged(self, account_id: str) -> Charged:
        """Auto top-ups charged on the account's current day and month."""
        billing = await self._store.billing(account_id)
        now = self.clock()
        return await self._store.charged(None, account_id, local_day(billing.time_zone, now), now)

    # --- manual top-ups -----------------------------------------------------

    async def manual(self, account_id: str, amount_micros: int, idempotency_key: str) -> TopUpRow:
        validation.check_id("account_id", account_id)
        validation.check_client_key("idempotency_key", idempotency_key)
        if not 0 < amount_micros <= MAX_CREDIT_MICROS:
            raise InvalidArgument("amount_micros", f"must be between 1 and {MAX_CREDIT_MICROS}")
        billing = await self._store.billing(account_id)
        money.check_whole_minor_units("amount_micros", amount_micros, billing.currency)
        if billing.primary_payment_method is None:
            raise FailedPrecondition(f"account {account_id!r} has no payment method")
        top_up = await self._store.create_top_up(
            account_id,
            "manual",
            idempotency_key,
            amount_micros,
            billing.currency,
            billing.primary_payment_method,
            None,
            local_day(billing.time_zone, self.clock()),
        )
        if top_up.status != "pending":
            return top_up  # a replay of a finished top-up
        done = await self.charge(top_up)
        if done.status == "succeeded":
            # P5: a manual top-up lifts a cap hold; the next dip may trigger at once.
            await self._hot.hold_top_up_trigger(account_id, 0)
            await self._hot.mark_top_up_capped(account_id, 0)
        return done

    # --- auto top-up ----------------------------------------------------------

    async def auto(self, account_id: str, retry_interval_s: float) -> str:
        """Handle one trigger: plan, charge, record. Returns the result for metrics:
        succeeded, a decline reason, network_error, or why nothing was charged."""
        hot = await self._hot.read_account(account_id)
        if hot is None:
            return "not_loaded"
        now = self.clock()
        billing = await self._store.billing(account_id)
        usd_rate = await self.rates.rate(local_day(billing.time_zone, now), billing.currency, "USD")
        if usd_rate is None:
            await self._store.record_stop(account_id, FX_RATE_MISSING)
            await self._hot.hold_top_up_trigger(account_id, retry_interval_s)
            return FX_RATE_MISSING
        # The planner works in the default currency (P6); floor: never overstate.
        balance = (hot.balance_micros / usd_rate).to_integral_value(rounding=ROUND_FLOOR)
        plan = await self._store.plan_auto(account_id, int(balance), now)
        if plan.top_up is None:
            reason = plan.stop_reason or "skipped"
            if reason in ("disabled", "paused"):
                await self._hot.set_auto_top_up(account_id, False, 0)
            # Capped or covered: look again after the retry interval, not per request.
            hold_s = 0.0 if reason == "above_threshold" else retry_interval_s
            await self._hot.hold_top_up_trigger(account_id, hold_s)
            if reason in ("daily_cap", "monthly_cap"):
                # Renewed by every capped trigger; outlives the hold that spaces them.
                await self._hot.mark_top_up_capped(account_id, 2 * retry_interval_s + 60)
            return reason
        return await self.finish_auto(plan.top_up, retry_interval_s)

    async def finish_auto(self, top_up: TopUpRow, retry_interval_s: float) -> str:
        """Charge a pending auto top-up and count its outcome (P10..P12)."""
        try:
            done = await self.charge(top_up)
        except Unavailable:
            if await self._gateway_confirms_no_charge(top_up):
                await self._store.fail(top_up.top_up_id, "network_error")
                done = await self._store.get(top_up.top_up_id)
            else:  # unknown outcome: stays pending, resolved by the recovery pass
                await self._hot.hold_top_up_trigger(top_up.account_id, retry_interval_s)
                return "network_error"
        if done.status == "succeeded":
            await self._store.record_auto_outcome(top_up.account_id, None)
            await self._hot.hold_top_up_trigger(top_up.account_id, 0)
            await self._hot.mark_top_up_capped(top_up.account_id, 0)
            return "succeeded"
        reason = done.decline_reason or "declined"
        if await self._store.record_auto_outcome(top_up.account_id, reason):
            log.warning("auto top-up of %r paused after repeated failures", top_up.account_id)
            metrics.AUTO_TOP_UPS_PAUSED.labels("failures").inc()
            await self._hot.set_auto_top_up(top_up.account_id, False, 0)
        # P10: the next request retries the same card, at most once per interval.
        await self._hot.hold_top_up_trigger(top_up.account_id, retry_interval_s)
        return reason

    async def _gateway_confirms_no_charge(self, top_up: TopUpRow) -> bool:
        try:
            return await self.gateway.lookup(top_up.gateway_key) is None
        except GatewayUnavailable:
            return False

    async def resolve_stale(self, older_than_s: float, retry_interval_s: float) -> int:
        """Finish top-ups a crash or a timeout left pending (same gateway key: no double charge)."""
        stale = await self._store.stale_pending(older_than_s)
        for top_up in stale:
            if top_up.kind == "auto":
                await self.finish_auto(top_up, retry_interval_s)
            else:
                try:
                    await self.charge(top_up)
                except Unavailable:
                    continue
        return len(stale)

    # --- charging -----------------------------------------------------------

    async def charge(self, top_up: TopUpRow) -> TopUpRow:
        """Charge a pending top-up's card and record the outcome (idempotent)."""
        card_currency = await self.gateway.card_currency(top_up.payment_method)
        conversion = await self._convert(top_up, card_currency)
        if conversion is None:
            await self._store.fail(top_up.top_up_id, FX_RATE_MISSING)
            return await self._store.get(top_up.top_up_id)
        if await self._over_charge_limit(top_up, conversion):
            await self._store.fail(top_up.top_up_id, CHARGE_OVER_LIMIT)
            return await self._store.get(top_up.top_up_id)
        amount_minor = money.to_minor(top_up.amount_micros, top_up.currency)
        started = time.perf_counter()
        try:
            charge = await self.gateway.charge(
                top_up.payment_method,
                conversion.charge_amount_minor,
                card_currency,
                top_up.gateway_key,
            )
        except GatewayRejected as exc:
            log.error("top-up %d: gateway refused the request (%s)", top_up.top_up_id, exc)
            await self._store.fail(top_up.top_up_id, "gateway_rejected")
            return await self._store.get(top_up.top_up_id)
        except GatewayUnavailable as exc:
            log.warning("top-up %d: gateway unavailable (%s)", top_up.top_up_id, exc)
            raise Unavailable(
                "the payment gateway did not answer; the top-up stays pending and is retried"
                " with the same idempotency key"
            ) from exc
        finally:
            metrics.TOP_UP_CHARGE_SECONDS.observe(time.perf_counter() - started)
        if not charge.succeeded:
            log.info(
                "top-up %d declined (%s) on %s",
                top_up.top_up_id,
                charge.decline_code,
                mask(top_up.payment_method),
            )
            await self._store.fail(top_up.top_up_id, charge.decline_code or "declined")
            return await self._store.get(top_up.top_up_id)
        description = _description(top_up)
        line = money.invoice_line(description, amount_minor, top_up.currency)
        async with self._pg.shard_lock([shard_of(top_up.account_id)], exclusive=False) as conn:
            credit = await self._store.succeed(
                conn,
                top_up,
                charge.charge_id,
                conversion,
                description,
                line,
                amount_minor,
            )
            await self._accounts.apply_recorded_credit(conn, credit)
        return await self._store.get(top_up.top_up_id)

    async def _over_charge_limit(self, top_up: TopUpRow, conversion: Conversion) -> bool:
        """True when the top-up would charge or credit more than the bound (issue 13
        item 7) and the gateway holds no charge for it yet (one made before a crash
        is recorded, never left uncredited)."""
        worth = max(conversion.credited_usd_micros, await self._charge_usd(top_up, conversion))
        if worth <= self._max_charge_micros:
            return False
        try:
            earlier = await self.gateway.lookup(top_up.gateway_key)
        except GatewayUnavailable as exc:
            raise Unavailable(
                f"payment gateway unavailable ({exc}); the top-up stays pending"
            ) from exc
        if earlier is not None:
            return False
        log.error(
            "top-up %d refused: worth %d micro-USD, above BALANCE_GATE_TOP_UP_MAX_CHARGE_MICROS"
            " (%d); check the FX rates of %s",
            top_up.top_up_id,
            worth,
            self._max_charge_micros,
            top_up.local_day,
        )
        return True

    async def _charge_usd(self, top_up: TopUpRow, conversion: Conversion) -> int:
        """The charge in micro-USD at the day's card-currency rate (rounded up).

        Without that rate it is what is credited: the same charge at the day's rates.
        """
        card = conversion.charge_currency
        charge_micros = conversion.charge_amount_minor * money.micros_per_minor(card)
        rate = await self.rates.rate(top_up.local_day, card, "USD")
        if rate is None:
            return conversion.credited_usd_micros
        return int((charge_micros * rate).to_integral_value(rounding=ROUND_CEILING))

    async def _convert(self, top_up: TopUpRow, card_currency: str) -> Conversion | None:
        """The day's conversion of a top-up (P6), or None when a rate is missing."""
        day, currency = top_up.local_day, top_up.currency
        usd_rate = await self.rates.rate(day, currency, "USD")
        card_rate = await self.rates.rate(day, currency, card_currency)
        if usd_rate is None or card_rate is None:
            return None
        return convert(top_up.amount_micros, currency, card_currency, usd_rate, card_rate)

    async def monthly_report(self, account_id: str, month: str) -> MonthlyReport:
        """P15: a month of top-ups, invoices and usage, summed for finance."""
        validation.check_id("account_id", account_id)
        try:
            first = dt.date.fromisoformat(f"{month}-01")
        except ValueError:
            raise InvalidArgument("month", f"{month!r} is not a YYYY-MM month") from None
        billing = await self._store.billing(account_id)
        return await self._store.monthly_report(account_id, first, billing)

    async def list_top_ups(self, account_id: str) -> list[TopUpRow]:
        validation.check_id("account_id", account_id)
        await self._store.billing(account_id)  # NOT_FOUND for an unknown account
        return await self._store.list_top_ups(account_id)

    async def list_invoices(self, account_id: str) -> list[InvoiceRow]:
        validation.check_id("account_id", account_id)
        await self._store.billing(account_id)
        return await self._store.list_invoices(account_id)


def _description(top_up: TopUpRow) -> str:
    if top_up.kind == "manual":
        return "Top-up — manual"
    assert top_up.threshold_micros is not None
    threshold = money.format_micros(top_up.threshold_micros, top_up.currency, drop_zero_cents=True)
    return f"Top-up — auto, threshold {threshold}"


def _check_auto_top_up(
    enabled: bool,
    threshold_micros: int,
    amount_micros: int,
    daily_cap_micros: int,
    monthly_cap_micros: int,
) -> None:
    if threshold_micros < 0 or threshold_micros > MAX_CREDIT_MICROS:
        raise InvalidArgument("threshold_micros", f"must be between 0 and {MAX_CREDIT_MICROS}")
    if not 0 < amount_micros <= MAX_CREDIT_MICROS:
        raise InvalidArgument("amount_micros", f"must be between 1 and {MAX_CREDIT_MICROS}")
    if amount_micros <= threshold_micros:
        # One top-up must lift even an empty balance above the threshold.
        raise InvalidArgument("amount_micros", "must be above threshold_micros")
    if enabled and daily_cap_micros <= 0:
        raise InvalidArgument("daily_cap_micros", "is required to enable auto top-up (P5)")
    if daily_cap_micros and daily_cap_micros < amount_micros:
        raise InvalidArgument("daily_cap_micros", "must be at least one top-up amount")
    if monthly_cap_micros < 0 or (monthly_cap_micros and monthly_cap_micros < amount_micros):
        raise InvalidArgument(
            "monthly_cap_micros", "must be 0 (none) or at least one top-up amount"
        )
    if daily_cap_micros > MAX_CREDIT_MICROS or monthly_cap_micros > MAX_CREDIT_MICROS:
        raise InvalidArgument("daily_cap_micros", f"caps must be at most {MAX_CREDIT_MICROS}")
