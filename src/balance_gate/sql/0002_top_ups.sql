-- Top-ups (P3..P5, P15, O1): settings, the charges, their invoices, and the
-- sandbox payment gateway's own records. Amounts of a top-up are micro-units of
-- the account's default currency; credits to the balance are micro-USD.

ALTER TABLE credits DROP CONSTRAINT credits_kind_check;
ALTER TABLE credits ADD CONSTRAINT credits_kind_check CHECK (kind IN ('adjustment', 'top_up'));

ALTER TABLE accounts
    -- The account's day for the daily cap (P5); an IANA zone name.
    ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC',
    ADD COLUMN primary_payment_method text,
    ADD COLUMN backup_payment_method text;

CREATE TABLE auto_top_up (
    account_id            text PRIMARY KEY REFERENCES accounts,
    enabled               boolean NOT NULL,
    threshold_micros      bigint NOT NULL CHECK (threshold_micros >= 0),
    amount_micros         bigint NOT NULL CHECK (amount_micros > 0),
    -- P5: no enabled auto top-up without a daily cap of at least one amount.
    daily_cap_micros      bigint NOT NULL CHECK (daily_cap_micros >= amount_micros OR NOT enabled),
    monthly_cap_micros    bigint CHECK (monthly_cap_micros >= amount_micros),
    -- Optional mode: top up *to* this balance instead of by whole amounts.
    target_balance_micros bigint CHECK (target_balance_micros > threshold_micros),
    paused                boolean NOT NULL DEFAULT false,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    last_decline_reason   text,
    last_stop_reason      text,
    -- The threshold in micro-USD that the debit scripts compare the balance with,
    -- converted at the latest known rate when the settings were saved (P6); the
    -- worker decides with the day's rate.
    trigger_threshold_usd_micros bigint NOT NULL,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE top_ups (
    top_up_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id         text NOT NULL REFERENCES accounts,
    kind               text NOT NULL CHECK (kind IN ('auto', 'manual')),
    idempotency_key    text NOT NULL,
    status             text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    amount_micros      bigint NOT NULL CHECK (amount_micros > 0),
    currency           text NOT NULL,
    credited_micros    bigint NOT NULL DEFAULT 0,
    payment_method     text NOT NULL,
    -- The threshold an auto top-up was triggered by, for its invoice line.
    threshold_micros   bigint,
    -- The account's local day and month when the top-up was created (caps).
    local_day          date NOT NULL,
    -- P6: what the card was charged, and the day's rates used (decimal, exact).
    charge_currency    text,
    charge_amount_minor bigint,
    usd_rate           numeric,
    card_rate          numeric,
    gateway_charge_id  text,
    decline_reason     text,
    credit_id          bigint REFERENCES credits,
    created_at         timestamptz NOT NULL DEFAULT now(),
    resolved_at        timestamptz,
    UNIQUE (account_id, idempotency_key)
);

CREATE INDEX top_ups_by_day ON top_ups (account_id, local_day);
CREATE INDEX top_ups_pending ON top_ups (created_at) WHERE status = 'pending';

-- Invoices are numbered without gaps across all accounts: the number is taken
-- from this counter in the transaction that writes the invoice.
CREATE TABLE invoice_counter (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_number  bigint NOT NULL
);
INSERT INTO invoice_counter (last_number) VALUES (0);

CREATE TABLE invoices (
    invoice_number  bigint PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts,
    top_up_id       bigint NOT NULL UNIQUE REFERENCES top_ups,
    line            text NOT NULL,
    amount_minor    bigint NOT NULL,
    currency        text NOT NULL,
    issued_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX invoices_by_account ON invoices (account_id, invoice_number);

-- The sandbox gateway keeps its charges here, like a processor would on its side,
-- so tests and operators can count them and look them up by idempotency key.
CREATE TABLE sandbox_charges (
    idempotency_key  text PRIMARY KEY,
    charge_id        text NOT NULL UNIQUE,
    payment_method   text NOT NULL,
    amount_minor     bigint NOT NULL,
    currency         text NOT NULL,
    succeeded        boolean NOT NULL,
    decline_code     text,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Daily FX rates (P6): 1 base = rate quote on rate_date.
CREATE TABLE fx_rates (
    rate_date  date NOT NULL,
    base       text NOT NULL CHECK (base ~ '^[A-Z]{3}$'),
    quote      text NOT NULL CHECK (quote ~ '^[A-Z]{3}$' AND quote <> base),
    rate       numeric NOT NULL CHECK (rate > 0),
    PRIMARY KEY (rate_date, base, quote)
);
