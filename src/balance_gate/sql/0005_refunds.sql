-- Refunds of the unconsumed part of a top-up (P13) and their credit notes.

CREATE TABLE refunds (
    refund_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts,
    top_up_id        bigint NOT NULL REFERENCES top_ups,
    idempotency_key  text NOT NULL,
    -- 0: everything unconsumed.
    requested_micros bigint NOT NULL CHECK (requested_micros >= 0),
    reason           text NOT NULL,
    -- taking: the row exists, the hot balance may or may not have given the
    --   money yet (the Redis marker refund:<id> says); pending: taken from the
    --   balance and booked on the lot, the gateway not yet sure; succeeded;
    --   failed: the gateway refused, the money went back to the balance.
    status           text NOT NULL CHECK (status IN ('taking', 'pending', 'succeeded', 'failed')),
    refunded_micros  bigint NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    refund_currency  text,
    refund_minor     bigint,
    gateway_refund_id text,
    failure_reason   text,
    credit_id        bigint REFERENCES credits,
    created_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz,
    UNIQUE (account_id, idempotency_key)
);

CREATE INDEX refunds_by_top_up ON refunds (top_up_id);

-- A credit note is a negative invoice, numbered in the invoices' gapless sequence.
CREATE TABLE credit_notes (
    invoice_number  bigint PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts,
    refund_id       bigint NOT NULL UNIQUE REFERENCES refunds,
    line            text NOT NULL,
    amount_minor    bigint NOT NULL CHECK (amount_minor < 0),
    currency        text NOT NULL,
    issued_at       timestamptz NOT NULL DEFAULT now()
);

-- The sandbox gateway's refunds, as a processor keeps them.
CREATE TABLE sandbox_refunds (
    idempotency_key  text PRIMARY KEY,
    refund_id        text NOT NULL UNIQUE,
    charge_id        text NOT NULL,
    amount_minor     bigint NOT NULL CHECK (amount_minor > 0),
    currency         text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
