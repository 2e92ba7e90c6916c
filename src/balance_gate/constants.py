"""Every Redis key shape, script result code and hard limit, in one place."""

from __future__ import annotations

from typing import Final

# Lua numbers are IEEE doubles: every amount and balance that reaches a script
# stays within the integers a double represents exactly.
MAX_SAFE_MICROS: Final = 2**53 - 1
# Hard ceiling of the max_request_micros setting ($1,000,000).
MAX_REQUEST_MICROS_LIMIT: Final = 10**12
# Largest single operator credit or debit ($100,000,000).
MAX_CREDIT_MICROS: Final = 10**14

# P2 promises de-duplication for at least 24 hours.
MIN_REQUEST_TTL_SECONDS: Final = 86_400

MAX_ID_BYTES: Final = 128
MAX_CREDIT_VALIDITY_DAYS: Final = 36_500
MAX_CAPABILITY_BYTES: Final = 64
MAX_REASON_CHARS: Final = 500
# The longest IANA zone name has 32 characters; zoneinfo looks names up as files.
MAX_TIME_ZONE_CHARS: Final = 64

# Accounts are spread over a fixed number of shards. All keys of one account,
# and the usage stream its debits append to, carry the shard's hash tag, so
# every script touches exactly one Redis Cluster slot. Changing this number
# renames every key: it is part of the data format.
SHARD_COUNT: Final = 256

# Redis consumer groups of the usage flushers and of the top-up workers.
USAGE_GROUP: Final = "flushers"
TOP_UP_GROUP: Final = "top-up-workers"

# A credit's "applied to Redis" marker must outlive any retry of that credit.
CREDIT_MARKER_TTL_SECONDS: Final = 30 * 86_400

# Postgres advisory-lock class for "the hot state of shard N": writers that
# go Postgres-then-Redis hold it shared, loads and rebuilds hold it exclusive.
HOT_SHARD_LOCK_CLASS: Final = 0x6267  # "bg"


class ScriptCode:
    """Result codes returned by the Lua scripts (first element of the reply)."""

    OK: Final = 0
    INSUFFICIENT_BALANCE: Final = 1
    ACCOUNT_DISABLED: Final = 2
    NOT_LOADED: Final = 3
    AMOUNT_MISMATCH: Final = 4
    REQUEST_NOT_FOUND: Final = 5
    ALREADY_SETTLED: Final = 6
    ALREADY_APPLIED: Final = 7
    OUT_OF_RANGE: Final = 8
    ALREADY_LOADED: Final = 9
    LEASED: Final = 10
    CAPABILITY_BLOCKED: Final = 11
    RATE_LIMITED: Final = 12
    BACKLOG_FULL: Final = 13
    # authorize.lua: this attempt was voided before it arrived (its caller gave up).
    VOIDED: Final = 14


class DenyCode:
    """Stable lowercase codes of a denied Authorize (the API contract)."""

    INSUFFICIENT_BALANCE: Final = "insufficient_balance"
    ACCOUNT_NOT_FOUND: Final = "account_not_found"
    ACCOUNT_DISABLED: Final = "account_disabled"
    # C4 stop-loss of a credit line: a high-cost capability past the stop-loss
    # point, or more requests per second than the stop-loss allows.
    CAPABILITY_BLOCKED: Final = "capability_blocked"
    RATE_LIMITED: Final = "rate_limited"
    # Redis did not answer in time (fail_closed), a fail_open budget is spent, or
    # usage cannot be recorded (Postgres away too long): docs/reliability.md.
    UNAVAILABLE: Final = "unavailable"
