-- P8: customer emails. A failure and its email are written in one transaction;
-- a sender delivers them over SMTP with retries, at least once.

ALTER TABLE accounts ADD COLUMN billing_email text;

CREATE TABLE email_outbox (
    email_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts,
    kind             text NOT NULL CHECK (kind IN ('top_up_failed', 'auto_top_up_paused')),
    to_address       text NOT NULL,
    subject          text NOT NULL,
    body             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    sent_at          timestamptz
);

CREATE INDEX email_outbox_unsent ON email_outbox (next_attempt_at) WHERE sent_at IS NULL;
