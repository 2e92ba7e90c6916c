"""Builds the gate's object graph from Settings: pools, stores, core services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from balance_gate import migrations
from balance_gate.accounts import Accounts
from balance_gate.appeals import Appeals
from balance_gate.breaker import CircuitBreaker
from balance_gate.credit_lines import CreditLines
from balance_gate.credit_reviews import CreditReviews, ReviewRules
from balance_gate.emails import EmailSender, SmtpConfig
from balance_gate.flusher import UsageFlusher, consumer_name
from balance_gate.fx import FxRates
from balance_gate.gate import Gate
from balance_gate.http_gateway import HttpGateway
from balance_gate.leases import LeaseConfig, LeaseManager
from balance_gate.lots import LotExpiry
from balance_gate.outage import OutageJournal
from balance_gate.payments import PaymentGateway, SandboxGateway
from balance_gate.postgres_store import PostgresStore
from balance_gate.prefixes import AccountPrefixes
from balance_gate.redis_client import is_cluster, redis_client
from balance_gate.redis_store import RedisStore
from balance_gate.refunds import Refunds
from balance_gate.settings import Settings
from balance_gate.top_up_store import TopUpStore
from balance_gate.top_up_worker import TopUpWorker
from balance_gate.topups import TopUps


def payment_gateway(settings: Settings, pool: asyncpg.Pool) -> PaymentGateway:
    if settings.payment_gateway == "http":
        return HttpGateway(
            settings.payment_gateway_url,
            settings.payment_gateway_token.get_secret_value() or None,
            timeout_s=settings.payment_gateway_timeout_ms / 1000,
            retries=settings.payment_gateway_retries,
        )
    return SandboxGateway(pool)


def smtp_config(settings: Settings) -> SmtpConfig | None:
    if not settings.smtp_host:
        return None
    return SmtpConfig(
        host=settings.smtp_host,
        port=settings.smtp_port,
        sender=settings.smtp_from,
        username=settings.smtp_username or None,
        password=settings.smtp_password.get_secret_value() or None,
        starttls=settings.smtp_starttls,
    )


def lease_manager(settings: Settings, hot: RedisStore) -> LeaseManager | None:
    prefixes = AccountPrefixes.parse(settings.lease_accounts)
    if not prefixes:
        return None
    config = LeaseConfig(
        accounts=prefixes.prefixes,
        min_rate_per_s=settings.lease_min_rate,
        horizon_s=settings.lease_horizon_ms / 1000,
        ttl_ms=settings.lease_ttl_ms,
        report_interval_s=settings.lease_report_interval_ms / 1000,
        idle_s=settings.lease_idle_ms / 1000,
    )
    return LeaseManager(hot, config, holder=f"lease-{consumer_name()}")


async def postgres_pool(settings: Settings) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=1,
        max_size=settings.database_pool_size,
        server_settings={"application_name": "balance-gate"},
        # A Postgres that went away must fail calls, not hang them: the flusher
        # and the top-up worker retry, and Authorize never waits on Postgres.
        timeout=settings.database_timeout_ms / 1000,
        command_timeout=settings.database_timeout_ms / 1000,
    )
    assert pool is not None
    return pool


@dataclass
class App:
    settings: Settings
    redis: aioredis.Redis
    pool: asyncpg.Pool
    hot: RedisStore
    pg: PostgresStore
    accounts: Accounts
    gate: Gate
    flusher: UsageFlusher
    topups: TopUps
    top_up_worker: TopUpWorker
    emails: EmailSender
    leases: LeaseManager | None
    refunds: Refunds
    expiry: LotExpiry
    appeals: Appeals
    credit_lines: CreditLines
    credit_reviews: CreditReviews

    @classmethod
    async def open(cls, settings: Settings, *, migrate: bool = True) -> App:
        pool = await postgres_pool(settings)
        if migrate:
            async with pool.acquire() as conn:
                await migrations.migrate(conn)
        client = redis_client(settings)
        hot = RedisStore(
            client,
            settings.redis_key_prefix,
            settings.request_ttl_seconds,
            settings.top_up_trigger_ttl_ms // 1000,
            settings.redis_batch_max,
            call_timeout_s=settings.redis_call_timeout_ms / 1000,
            backlog_max=settings.usage_backlog_max,
            low_balance_micros=settings.low_balance_warning_micros,
        )
        pg = PostgresStore(pool)
        leases = lease_manager(settings, hot)
        release_lease = None if leases is None else leases.release_after_cut
        accounts = Accounts(
            pg,
            hot,
            settings.not_found_cache_ms / 1000,
            not_found_max_entries=settings.not_found_cache_entries,
            load_slots=settings.account_load_slots,
            load_wait_s=settings.account_load_wait_ms / 1000,
            release_lease=release_lease,
        )
        gate = Gate(
            hot,
            accounts,
            settings.max_request_micros,
            CircuitBreaker(settings.breaker_failures, settings.breaker_open_ms / 1000),
            OutageJournal(
                hot,
                settings.redis_fail_mode,
                settings.fail_open_budget_micros,
                settings.fail_open_max_requests,
                holder=f"outage-{consumer_name()}",
                exists=accounts.ensure_loaded,
                max_voids=settings.outage_max_voids,
            ),
            leases,
            shadow=AccountPrefixes.parse(settings.shadow_accounts),
            recall_wait_s=settings.lease_recall_wait_ms / 1000,
            recall_poll_s=settings.lease_report_interval_ms / 1000,
        )
        flusher = UsageFlusher(
            hot,
            pg,
            batch_size=settings.flush_batch_size,
            block_ms=settings.flush_block_ms,
            interval_ms=settings.flush_interval_ms,
            claim_idle_ms=settings.flush_claim_idle_ms,
            stats_interval_ms=settings.stats_interval_ms,
        )
        topups = TopUps(
            TopUpStore(pool, pg),
            pg,
            hot,
            accounts,
            payment_gateway(settings, pool),
            FxRates(pool, settings.fx_rate_max_change_pct),
            max_charge_micros=settings.top_up_max_charge_micros,
        )
        worker = TopUpWorker(
            hot,
            topups,
            retry_interval_s=settings.top_up_retry_interval_ms / 1000,
            concurrency=settings.top_up_concurrency,
        )
        emails = EmailSender(pool, smtp_config(settings))
        refunds = Refunds(pool, pg, hot, accounts, topups.gateway)
        lines = CreditLines(pool, pg, hot, release_lease)
        return cls(
            settings,
            client,
            pool,
            hot,
            pg,
            accounts,
            gate,
            flusher,
            topups,
            worker,
            emails,
            leases,
            refunds,
            LotExpiry(pool, pg, hot, accounts),
            Appeals(pool, refunds, topups),
            lines,
            CreditReviews(
                pool,
                lines,
                ReviewRules(
                    overdue_invoices=settings.credit_review_overdue_invoices,
                    surge_factor=settings.credit_review_surge_factor,
                    high_cost_margin_pct=settings.credit_review_high_cost_margin_pct,
                    auto_cut_pct=settings.credit_review_auto_cut_pct,
                ),
            ),
        )

    @classmethod
    @asynccontextmanager
    async def opened(cls, settings: Settings, *, migrate: bool) -> AsyncIterator[App]:
        """An App for one command: opened, then closed whatever happens."""
        app = await cls.open(settings, migrate=migrate)
        try:
            yield app
        finally:
            await app.close()

    async def close(self) -> None:
        if is_cluster(self.redis):
            await self.redis.aclose()
        else:
            # We built the pool, so closing the client must close it too.
            await self.redis.aclose(close_connection_pool=True)
        if isinstance(self.topups.gateway, HttpGateway):
            await self.topups.gateway.close()
        await self.pool.close()
