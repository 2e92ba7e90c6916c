"""Every Prometheus metric of the gate, defined together. No per-account labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# `_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# 100 us .. 50 ms in fine steps (the hot path), then a coarse tail.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

AUTHORIZE_DECISIONS = Counter(
    "balance_gate_authorize",
    "Authorize decisions, by result: allowed or the denial code.",
    ["result"],
)
AUTHORIZE_SECONDS = Histogram(
    "balance_gate_authorize_duration_seconds",
    "Time to decide one Authorize, from validation to the answer.",
    buckets=_LATENCY_BUCKETS,
)
SETTLES = Counter(
    "balance_gate_settle",
    "Settle calls, by result: settled, replayed, request_not_found, already_settled.",
    ["result"],
)
RPC_ERRORS = Counter(
    "balance_gate_rpc_errors",
    "RPCs that ended with an error status, by method and gRPC status code.",
    ["method", "status"],
)
HTTP_AUTHZ_CONNECTIONS = Gauge(
    "balance_gate_http_authz_connections",
    "Connections the HTTP endpoint holds (at most BALANCE_GATE_MAX_CONNECTIONS).",
)
HTTP_AUTHZ_CONNECTIONS_CLOSED = Counter(
    "balance_gate_http_authz_connections_closed",
    "HTTP endpoint connections closed by a limit: over_limit, header_timeout.",
    ["reason"],
)
ADMIN_AUTH_FAILURES = Counter(
    "balance_gate_admin_auth_failures",
    "Admin calls refused for their token, by reason: missing, not_bearer, invalid.",
    ["reason"],
)
REDIS_ERRORS = Counter(
    "balance_gate_redis_errors",
    "Redis calls that failed (connection, timeout, server error), by component.",
    ["component"],
)
POSTGRES_ERRORS = Counter(
    "balance_gate_postgres_errors",
    "Postgres calls that failed, by component.",
    ["component"],
)
ACCOUNT_LOADS = Counter(
    "balance_gate_account_loads",
    "Loads of accounts from Postgres into Redis, by result: loaded, already_loaded, not_found,"
    " busy (no load slot free in time).",
    ["result"],
)
USAGE_FLUSHED = Counter(
    "balance_gate_usage_flushed_events",
    "Usage events recorded in Postgres by the flusher (duplicates not counted).",
)
USAGE_DUPLICATES_REVERTED = Counter(
    "balance_gate_usage_duplicates_reverted",
    "Debits of requests the ledger already had (Redis lost its request records), given back.",
)
USAGE_REPRICED = Counter(
    "balance_gate_usage_repriced",
    "Usage events booked at another amount than Redis took: a settle priced against the"
    " ledger's authorization of its request (issue 13 item 2); corrected in Redis.",
)
USAGE_DEAD_LETTERS = Counter(
    "balance_gate_usage_dead_letters",
    "Usage events the ledger refused, set aside in usage_dead_letters and undone in Redis.",
)
USAGE_BACKLOG = Gauge(
    "balance_gate_usage_backlog_events",
    "Usage events debited in Redis and not yet recorded in Postgres.",
)
USAGE_FLUSH_LAG = Gauge(
    "balance_gate_usage_flush_lag_seconds",
    "Age of the oldest usage event not yet recorded in Postgres (0 when none).",
)
TOP_UPS = Counter(
    "balance_gate_top_ups",
    "Auto top-up triggers by result: succeeded, a decline reason, network_error, or why"
    " nothing was charged (daily_cap, monthly_cap, paused, disabled, pending_covers, ...).",
    ["result"],
)
TOP_UP_CHARGE_SECONDS = Histogram(
    "balance_gate_top_up_charge_duration_seconds",
    "Time the payment gateway took to answer one charge (retries included).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TOP_UP_TRIGGERS_PENDING = Gauge(
    "balance_gate_top_up_triggers_pending",
    "Top-up triggers raised and not yet handled, over all shards.",
)
TOP_UPS_PENDING = Gauge(
    "balance_gate_top_ups_pending", "Top-ups created and not yet resolved (charge outcome unknown)."
)
TOP_UP_SECONDS = Histogram(
    "balance_gate_top_up_duration_seconds",
    "Time to handle one auto top-up trigger, charge included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
AUTO_TOP_UPS_PAUSED = Counter(
    "balance_gate_auto_top_ups_paused",
    "Accounts whose auto top-up was paused until resumed by hand, by reason: failures"
    " (3 failed charges per card, P11/P12) or abuse_appeal (P14).",
    ["reason"],
)
# Exported as 0 from the start: `increase()` cannot see a series whose first sample is 1,
# and the alert on pauses must fire for the first one.
for _reason in ("failures", "abuse_appeal"):
    AUTO_TOP_UPS_PAUSED.labels(_reason)
EMAILS = Counter(
    "balance_gate_emails", "Customer emails by delivery result: sent, failed (retried).", ["result"]
)
EMAIL_BACKLOG = Gauge(
    "balance_gate_email_outbox_backlog", "Customer emails written and not yet delivered."
)
CREDITS_REAPPLIED = Counter(
    "balance_gate_credits_reapplied",
    "Credits found committed in Postgres but not confirmed in Redis, and applied by the sweeper.",
)

LEASED_AUTHORIZE = Counter(
    "balance_gate_leased_authorize",
    "Authorize decisions allowed from this sidecar's balance leases (no Redis round trip).",
)
LEASES_HELD = Gauge("balance_gate_leases_held", "Balance leases this sidecar holds.")
LEASE_RECALLS = Counter(
    "balance_gate_lease_recalls",
    "Leases returned because another sidecar needed the money (recall).",
)

REDIS_CIRCUIT_OPEN = Gauge(
    "balance_gate_redis_circuit_open",
    "1 while the Redis circuit breaker is open (Authorize answers by the fail mode).",
)
REDIS_CIRCUIT_OPENED = Counter(
    "balance_gate_redis_circuit_opened", "Times the Redis circuit breaker opened."
)
OUTAGE_DECISIONS = Counter(
    "balance_gate_outage_decisions",
    "Authorize decisions taken without Redis, by result: allowed (fail_open, debited later),"
    " denied (unavailable).",
    ["result"],
)
OUTAGE_JOURNAL = Gauge(
    "balance_gate_outage_journal",
    "Requests decided without Redis still to be settled in Redis (fail_open debits and"
    " fail_closed voids).",
)
OUTAGE_REPLAYED = Counter(
    "balance_gate_outage_replayed",
    "Outage journal entries settled in Redis once it answered again, by kind: debit, void.",
    ["kind"],
)
USAGE_BACKLOG_FULLEST_SHARD = Gauge(
    "balance_gate_usage_backlog_fullest_shard_events",
    "Usage events in the fullest shard's stream; Authorize denies 'unavailable' once it"
    " reaches balance_gate_usage_backlog_shard_limit_events (alert at half of it).",
)
USAGE_BACKLOG_SHARD_LIMIT = Gauge(
    "balance_gate_usage_backlog_shard_limit_events",
    "The usage_backlog_max setting: most usage events one shard's stream may hold.",
)
SHADOW_ALLOWED = Counter(
    "balance_gate_shadow_allowed",
    "Shadow mode: requests the gate would have denied, by code, and allowed anyway.",
    ["code"],
)
