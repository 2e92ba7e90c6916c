-- The system of record: accounts, credits and usage. Redis can be rebuilt from these.
-- All money is bigint micro-USD (P1: balances are in USD). accounts.currency is the
-- default currency that prices top-ups and invoices (P6).

CREATE TABLE accounts (
    account_id      text PRIMARY KEY CHECK (octet_length(account_id) BETWEEN 1 AND 128),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    -- Running totals, kept in the same transactions as the rows they sum, so a
    -- load needs one row instead of a scan of the account's history.
    credited_micros bigint NOT NULL DEFAULT 0,
    used_micros     bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The hot balance is a Lua double: keep it exactly representable.
    CONSTRAINT ledger_balance_in_range
        CHECK (credited_micros - used_micros BETWEEN -9007199254740991 AND 9007199254740991)
);

CREATE TABLE credits (
    credit_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts,
    amount_micros   bigint NOT NULL CHECK (amount_micros <> 0),
    kind            text NOT NULL CHECK (kind IN ('adjustment')),
    reason          text NOT NULL,
    idempotency_key text NOT NULL,
    -- Set once the amount is known to be in the Redis balance (or counted by a
    -- load); a credit left false by a crash is applied again by the sweeper,
    -- which the Redis marker makes harmless.
    hot_applied     boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, idempotency_key)
);

CREATE INDEX credits_not_hot_applied ON credits (created_at) WHERE NOT hot_applied;

CREATE TABLE usage_events (
    account_id      text NOT NULL REFERENCES accounts,
    request_id      text NOT NULL,
    -- 'authorize' debits the authorized amount; 'settle' the difference of
    -- the final cost to it (negative when credited back).
    kind            text NOT NULL CHECK (kind IN ('authorize', 'settle')),
    amount_micros   bigint NOT NULL CHECK (kind = 'settle' OR amount_micros >= 0),
    capability      text NOT NULL DEFAULT '',
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    stream_entry_id text NOT NULL,
    -- One debit per request (P2), however often the flusher sees it.
    PRIMARY KEY (account_id, request_id, kind)
);

CREATE INDEX usage_events_occurred_at ON usage_events (account_id, occurred_at);
