"""The gRPC servicers: thin translations between protobuf and the core.

Errors become gRPC status codes through status.py, the table every edge
shares. Nothing surfaces as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from balance_gate import errors, fx, metrics
from balance_gate.accounts import Accounts, AccountView
from balance_gate.appeals import Appeal, Appeals
from balance_gate.auth import ProxyIdentities
from balance_gate.credit_lines import CreditLine, CreditLines
from balance_gate.credit_reviews import CreditReviews, Review
from balance_gate.decoding import Malformed
from balance_gate.gate import Gate
from balance_gate.payments import mask
from balance_gate.refunds import RefundRow, Refunds
from balance_gate.status import status_of
from balance_gate.top_up_store import AutoTopUpRow, InvoiceRow, TopUpRow
from balance_gate.topups import TopUps
from balance_gate.v1 import admin_pb2, admin_pb2_grpc, gate_pb2, gate_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map exceptions of one RPC method to a status (see module docstring)."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            status = status_of(exc, name)
        metrics.RPC_ERRORS.labels(name, status.grpc_code.name).inc()
        await context.abort(status.grpc_code, status.message)
        raise AssertionError("abort() returned")  # pragma: no cover

    return wrapper


class BalanceGateServicer(gate_pb2_grpc.BalanceGateServicer):
    def __init__(
        self,
        gate: Gate,
        stream_max_in_flight: int = 1_024,
        identities: ProxyIdentities | None = None,
    ) -> None:
        self._gate = gate
        self._stream_max_in_flight = stream_max_in_flight
        # Which proxy may debit which accounts (auth.py); by default, any.
        self._identities = identities or ProxyIdentities({})

    async def _decide(self, request: gate_pb2.AuthorizeRequest) -> gate_pb2.AuthorizeResponse:
        decision = await self._gate.authorize(
            request.account_id, request.request_id, request.amount_micros, request.capability
        )
        return gate_pb2.AuthorizeResponse(
            allowed=decision.allowed,
            code=decision.code,
            balance_micros=decision.balance_micros,
            replayed=decision.replayed,
            request_id=request.request_id,
            low_balance=decision.low_balance,
            shadow=decision.shadow,
        )

    @rpc
    async def Authorize(
        self, request: gate_pb2.AuthorizeRequest, context: Context
    ) -> gate_pb2.AuthorizeResponse:
        self._identities.check(context, request.account_id)
        return await self._decide(request)

    async def AuthorizeStream(
        self,
        request_iterator: AsyncIterator[gate_pb2.AuthorizeRequest | Malformed],
        context: Context,
    ) -> AsyncIterator[gate_pb2.AuthorizeResponse]:
        """Decide each request as it arrives; answer in the order decisions finish.

        A caller that is not a listed proxy is refused the whole stream; an account
        it may not debit is one request's PERMISSION_DENIED status, and a message
        that does not parse (decoding.py) one request's INVALID_ARGUMENT.
        """
        try:
            proxy = self._identities.proxy(context)
        except errors.PermissionDenied as exc:
            metrics.RPC_ERRORS.labels("AuthorizeStream", "PERMISSION_DENIED").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        answers: asyncio.Queue[gate_pb2.AuthorizeResponse | None] = asyncio.Queue()
        room = asyncio.Semaphore(self._stream_max_in_flight)
        in_flight: set[asyncio.Task[None]] = set()

        async def answer(request: gate_pb2.AuthorizeRequest | Malformed) -> None:
            answers.put_nowait(await self._stream_answer(request, proxy))

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    await room.acquire()  # backpressure: stop reading, HTTP/2 does the rest
                    task = asyncio.create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                while in_flight:
                    await asyncio.wait(set(in_flight))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await answers.get()) is not None:
                room.release()
                yield response
            await reader  # surfaces a failed read of the request stream
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()

    async def _stream_answer(
        self, request: gate_pb2.AuthorizeRequest | Malformed, proxy: str | None
    ) -> gate_pb2.AuthorizeResponse:
        try:
            if isinstance(request, Malformed):
                raise request.error()
            self._identities.check_account(proxy, request.account_id)
            return await self._decide(request)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own answer
            status = status_of(exc, "AuthorizeStream")
            metrics.RPC_ERRORS.labels("AuthorizeStream", status.grpc_code.name).inc()
            return gate_pb2.AuthorizeResponse(
                request_id=request.request_id,
                status_code=status.grpc_code.value[0],
                status_message=status.message,
            )

    @rpc
    async def Settle(
        self, request: gate_pb2.SettleRequest, context: Context
    ) -> gate_pb2.SettleResponse:
        self._identities.check(context, request.account_id)
        settlement = await self._gate.settle(
            request.account_id, request.request_id, request.amount_micros
        )
        return gate_pb2.SettleResponse(
            balance_micros=settlement.balance_micros,
            delta_micros=settlement.delta_micros,
            replayed=settlement.replayed,
        )


_STATUS_NAMES = {
    admin_pb2.ACCOUNT_STATUS_ACTIVE: "active",
    admin_pb2.ACCOUNT_STATUS_DISABLED: "disabled",
}
_STATUS_ENUMS = {name: value for value, name in _STATUS_NAMES.items()}


def _timestamp(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _auto_top_up(row: AutoTopUpRow | None) -> admin_pb2.AutoTopUp | None:
    if row is None:
        return None
    return admin_pb2.AutoTopUp(
        enabled=row.enabled,
        threshold_micros=row.threshold_micros,
        amount_micros=row.amount_micros,
        daily_cap_micros=row.daily_cap_micros,
        monthly_cap_micros=row.monthly_cap_micros or 0,
        paused=row.paused,
        consecutive_failures=row.consecutive_failures,
        last_decline_reason=row.last_decline_reason or "",
        last_stop_reason=row.last_stop_reason or "",
        target_balance_micros=row.target_balance_micros or 0,
    )


_TOP_UP_STATUS = {
    "pending": admin_pb2.TOP_UP_STATUS_PENDING,
    "succeeded": admin_pb2.TOP_UP_STATUS_SUCCEEDED,
    "failed": admin_pb2.TOP_UP_STATUS_FAILED,
}


def _top_up(row: TopUpRow) -> admin_pb2.TopUpRecord:
    return admin_pb2.TopUpRecord(
        top_up_id=row.top_up_id,
        account_id=row.account_id,
        kind=row.kind,
        status=_TOP_UP_STATUS[row.status],
        amount_micros=row.amount_micros,
        currency=row.currency,
        credited_micros=row.credited_micros,
        payment_method=mask(row.payment_method),
        decline_reason=row.decline_reason or "",
        created_at=_timestamp(row.created_at),
        invoice_number=row.invoice_number or 0,
        charge_currency=row.charge_currency or "",
        charge_amount_minor=row.charge_amount_minor or 0,
        usd_rate="" if row.usd_rate is None else str(row.usd_rate),
        card_rate="" if row.card_rate is None else str(row.card_rate),
        local_day=row.local_day.isoformat(),
    )


def _invoice(row: InvoiceRow) -> admin_pb2.Invoice:
    return admin_pb2.Invoice(
        invoice_number=row.invoice_number,
        account_id=row.account_id,
        top_up_id=row.top_up_id,
        line=row.line,
        amount_minor=row.amount_minor,
        currency=row.currency,
        issued_at=_timestamp(row.issued_at),
    )


def _account(view: AccountView) -> admin_pb2.Account:
    created_at = _timestamp(view.created_at)
    return admin_pb2.Account(
        account_id=view.account_id,
        currency=view.currency,
        balance_micros=view.balance_micros,
        status=_STATUS_ENUMS[view.status],
        created_at=created_at,
        credited_micros=view.credited_micros,
        used_micros=view.used_micros,
        unflushed_usage_micros=view.unflushed_usage_micros,
        credit_used_micros=view.credit_used_micros,
    )


def _refund(row: RefundRow) -> admin_pb2.RefundRecord:
    return admin_pb2.RefundRecord(
        refund_id=row.refund_id,
        account_id=row.account_id,
        top_up_id=row.top_up_id,
        requested_micros=row.requested_micros,
        refunded_micros=row.refunded_micros,
        partial=row.partial,
        status=row.status,
        refund_currency=row.refund_currency or "",
        refund_minor=row.refund_minor or 0,
        credit_note_number=row.credit_note_number or 0,
        failure_reason=row.failure_reason or "",
    )


def _appeal(appeal: Appeal) -> admin_pb2.AbuseAppeal:
    return admin_pb2.AbuseAppeal(
        appeal_id=appeal.appeal_id,
        account_id=appeal.account_id,
        description=appeal.description,
        filed_at=_timestamp(appeal.filed_at),
        status=appeal.status,
        decided_at=_timestamp(appeal.decided_at) if appeal.decided_at else None,
        top_up_ids=appeal.top_up_ids,
        refunded_micros=appeal.refunded_micros,
    )


def _credit_line(line: CreditLine) -> admin_pb2.CreditLine:
    return admin_pb2.CreditLine(
        account_id=line.account_id,
        limit_micros=line.limit_micros,
        deposit_micros=line.deposit_micros,
        review_every_days=line.review_every_days,
        next_review_on=line.next_review_on.isoformat(),
        high_cost_capabilities=line.high_cost_capabilities,
        stop_loss=admin_pb2.StopLoss(
            share_pct=line.stop_loss_share_pct, rate_per_s=line.stop_loss_rate_per_s
        ),
        entity=line.entity,
        payment_terms_days=line.payment_terms_days,
        expected_monthly_micros=line.expected_monthly_micros,
        expected_peak_micros=line.expected_peak_micros,
        expected_high_cost_share_pct=line.expected_high_cost_share_pct,
    )


def _review(review: Review) -> admin_pb2.CreditReview:
    return admin_pb2.CreditReview(
        review_id=review.review_id,
        account_id=review.account_id,
        reason=review.reason,
        detail=review.detail,
        opened_at=_timestamp(review.opened_at),
        limit_before_micros=review.limit_before,
        limit_cut_to_micros=review.limit_cut_to,
        status=review.status,
        closed_at=_timestamp(review.closed_at) if review.closed_at else None,
        decision=review.decision or "",
        new_limit_micros=review.new_limit,
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        accounts: Accounts,
        topups: TopUps,
        refunds: Refunds,
        appeals: Appeals,
        credit_lines: CreditLines,
        credit_reviews: CreditReviews,
    ) -> None:
        self._accounts = accounts
        self._topups = topups
        self._refunds = refunds
        self._appeals = appeals
        self._credit_lines = credit_lines
        self._credit_reviews = credit_reviews

    @rpc
    async def ListCreditReviews(
        self, request: admin_pb2.ListCreditReviewsRequest, context: Context
    ) -> admin_pb2.ListCreditReviewsResponse:
        reviews = await self._credit_reviews.list(request.account_id)
        return admin_pb2.ListCreditReviewsResponse(reviews=[_review(r) for r in reviews])

    @rpc
    async def CloseCreditReview(
        self, request: admin_pb2.CloseCreditReviewRequest, context: Context
    ) -> admin_pb2.CreditReview:
        new_limit = request.new_limit_micros if request.HasField("new_limit_micros") else None
        return _review(
            await self._credit_reviews.close(request.review_id, request.decision, new_limit)
        )

    @rpc
    async def MarkInvoiceOverdue(
        self, request: admin_pb2.MarkInvoiceRequest, context: Context
    ) -> admin_pb2.MarkInvoiceResponse:
        await self._credit_reviews.mark_invoice(request.invoice_number, overdue=True)
        return admin_pb2.MarkInvoiceResponse()

    @rpc
    async def MarkInvoicePaid(
        self, request: admin_pb2.MarkInvoiceRequest, context: Context
    ) -> admin_pb2.MarkInvoiceResponse:
        await self._credit_reviews.mark_invoice(request.invoice_number, overdue=False)
        return admin_pb2.MarkInvoiceResponse()

    @rpc
    async def SetCreditLine(
        self, request: admin_pb2.CreditLine, context: Context
    ) -> admin_pb2.CreditLine:
        stop_loss = request.stop_loss if request.HasField("stop_loss") else None
        line = CreditLine(
            account_id=request.account_id,
            limit_micros=request.limit_micros,
            deposit_micros=request.deposit_micros,
            review_every_days=request.review_every_days,
            next_review_on=dt.date.today(),  # set by the store
            high_cost_capabilities=tuple(request.high_cost_capabilities),
            stop_loss_share_pct=stop_loss.share_pct if stop_loss and stop_loss.share_pct else 100,
            stop_loss_rate_per_s=stop_loss.rate_per_s if stop_loss else 0,
            entity=request.entity,
            payment_terms_days=request.payment_terms_days,
            expected_monthly_micros=request.expected_monthly_micros,
            expected_peak_micros=request.expected_peak_micros,
            expected_high_cost_share_pct=request.expected_high_cost_share_pct,
        )
        return _credit_line(await self._credit_lines.set(line))

    @rpc
    async def GetCreditLine(
        self, request: admin_pb2.GetCreditLineRequest, context: Context
    ) -> admin_pb2.CreditLine:
        return _credit_line(await self._credit_lines.get(request.account_id))

    @rpc
    async def FileAbuseAppeal(
        self, request: admin_pb2.FileAbuseAppealRequest, context: Context
    ) -> admin_pb2.AbuseAppeal:
        return _appeal(await self._appeals.file(request.account_id, request.description))

    @rpc
    async def ResolveAbuseAppeal(
        self, request: admin_pb2.ResolveAbuseAppealRequest, context: Context
    ) -> admin_pb2.AbuseAppeal:
        return _appeal(await self._appeals.resolve(request.appeal_id, request.confirmed))

    @rpc
    async def RefundTopUp(
        self, request: admin_pb2.RefundTopUpRequest, context: Context
    ) -> admin_pb2.RefundRecord:
        row = await self._refunds.refund_top_up(
            request.top_up_id, request.amount_micros, request.reason, request.idempotency_key
        )
        return _refund(row)

    async def _current(self, account_id: str) -> admin_pb2.Account:
        """The account as it is now, after a change made through another call."""
        return await self._full_account(await self._accounts.get(account_id))

    async def _full_account(self, view: AccountView) -> admin_pb2.Account:
        account = _account(view)
        billing = await self._topups.billing(view.account_id)
        settings = await self._topups.auto_top_up(view.account_id)
        auto = _auto_top_up(settings)
        if settings is not None and auto is not None:
            charged = await self._topups.charged(view.account_id)
            auto.charged_today_micros = charged.today_micros
            auto.charged_this_month_micros = charged.month_micros
            auto.daily_cap_reached = (
                charged.today_micros + settings.amount_micros > settings.daily_cap_micros
            )
            account.auto_top_up.CopyFrom(auto)
        account.primary_payment_method = mask(billing.primary_payment_method or "")
        account.backup_payment_method = mask(billing.backup_payment_method or "")
        account.time_zone = billing.time_zone
        return account

    @rpc
    async def CreateAccount(
        self, request: admin_pb2.CreateAccountRequest, context: Context
    ) -> admin_pb2.Account:
        return await self._full_account(
            await self._accounts.create(request.account_id, request.currency)
        )

    @rpc
    async def GetAccount(
        self, request: admin_pb2.GetAccountRequest, context: Context
    ) -> admin_pb2.Account:
        return await self._current(request.account_id)

    @rpc
    async def Credit(self, request: admin_pb2.CreditRequest, context: Context) -> admin_pb2.Account:
        view = await self._accounts.credit(
            request.account_id, request.amount_micros, request.reason, request.idempotency_key
        )
        return await self._full_account(view)

    @rpc
    async def SetAccountStatus(
        self, request: admin_pb2.SetAccountStatusRequest, context: Context
    ) -> admin_pb2.Account:
        status = _STATUS_NAMES.get(request.status)
        if status is None:
            raise errors.InvalidArgument(
                "status", "must be ACCOUNT_STATUS_ACTIVE or ACCOUNT_STATUS_DISABLED"
            )
        return await self._full_account(await self._accounts.set_status(request.account_id, status))

    @rpc
    async def SetPaymentMethods(
        self, request: admin_pb2.SetPaymentMethodsRequest, context: Context
    ) -> admin_pb2.Account:
        await self._topups.set_payment_methods(request.account_id, request.primary, request.backup)
        return await self._current(request.account_id)

    @rpc
    async def SetAutoTopUp(
        self, request: admin_pb2.SetAutoTopUpRequest, context: Context
    ) -> admin_pb2.Account:
        await self._topups.set_auto_top_up(
            request.account_id,
            request.enabled,
            request.threshold_micros,
            request.amount_micros,
            request.daily_cap_micros,
            request.monthly_cap_micros,
            request.target_balance_micros,
        )
        return await self._current(request.account_id)

    @rpc
    async def ResumeAutoTopUp(
        self, request: admin_pb2.ResumeAutoTopUpRequest, context: Context
    ) -> admin_pb2.Account:
        await self._topups.resume(request.account_id)
        return await self._current(request.account_id)

    @rpc
    async def TopUp(
        self, request: admin_pb2.TopUpRequest, context: Context
    ) -> admin_pb2.TopUpRecord:
        return _top_up(
            await self._topups.manual(
                request.account_id, request.amount_micros, request.idempotency_key
            )
        )

    @rpc
    async def ListTopUps(
        self, request: admin_pb2.ListTopUpsRequest, context: Context
    ) -> admin_pb2.ListTopUpsResponse:
        rows = await self._topups.list_top_ups(request.account_id)
        return admin_pb2.ListTopUpsResponse(top_ups=[_top_up(r) for r in rows])

    @rpc
    async def ListInvoices(
        self, request: admin_pb2.ListInvoicesRequest, context: Context
    ) -> admin_pb2.ListInvoicesResponse:
        rows = await self._topups.list_invoices(request.account_id)
        return admin_pb2.ListInvoicesResponse(invoices=[_invoice(r) for r in rows])

    @rpc
    async def SetFxRates(
        self, request: admin_pb2.SetFxRatesRequest, context: Context
    ) -> admin_pb2.SetFxRatesResponse:
        day = fx.parse_date("date", request.date)
        rates = {
            quote: fx.parse_rate(f"rates[{quote}]", text) for quote, text in request.rates.items()
        }
        if not rates:
            raise errors.InvalidArgument("rates", "must not be empty")
        stored = await self._topups.rates.set_rates(day, request.base, rates, request.force_reason)
        return admin_pb2.SetFxRatesResponse(stored=stored)

    @rpc
    async def SetBillingEmail(
        self, request: admin_pb2.SetBillingEmailRequest, context: Context
    ) -> admin_pb2.Account:
        await self._topups.set_billing_email(request.account_id, request.email)
        return await self._current(request.account_id)

    @rpc
    async def MonthlyReport(
        self, request: admin_pb2.MonthlyReportRequest, context: Context
    ) -> admin_pb2.MonthlyReportResponse:
        report = await self._topups.monthly_report(request.account_id, request.month)
        sums = {f.name: getattr(report, f.name) for f in fields(report) if f.name != "month"}
        return admin_pb2.MonthlyReportResponse(
            account_id=request.account_id, month=request.month, **sums
        )

    @rpc
    async def SetCreditValidity(
        self, request: admin_pb2.SetCreditValidityRequest, context: Context
    ) -> admin_pb2.Account:
        await self._accounts.set_credit_validity(request.account_id, request.days)
        return await self._current(request.account_id)

    @rpc
    async def SetAccountTimeZone(
        self, request: admin_pb2.SetAccountTimeZoneRequest, context: Context
    ) -> admin_pb2.Account:
        await self._topups.set_time_zone(request.account_id, request.time_zone)
        return await self._current(request.account_id)
