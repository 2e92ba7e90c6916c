-- Credit lines (C1 to C4; ../shared/seeds/credit-line-review.zh.txt): a limit lets
-- the balance go down to -limit_micros. The profile fields (C2) are data for the
-- reviewer; the stop-loss settings (C4) are enforced in the debit script.

CREATE TABLE credit_lines (
    account_id                    text PRIMARY KEY REFERENCES accounts,
    -- C1: the largest unpaid exposure accepted; a new line starts conservative.
    limit_micros                  bigint NOT NULL CHECK (limit_micros >= 0),
    deposit_micros                bigint NOT NULL DEFAULT 0 CHECK (deposit_micros >= 0),
    -- C3: reviews every N days (30 or 90 are usual).
    review_every_days             integer NOT NULL CHECK (review_every_days BETWEEN 1 AND 366),
    next_review_on                date NOT NULL,
    -- C4: stop-loss. From stop_loss_share_pct percent of the limit used on,
    -- high-cost capabilities are blocked and, if set, requests are rate limited.
    high_cost_capabilities        text[] NOT NULL DEFAULT '{}',
    stop_loss_share_pct           integer NOT NULL DEFAULT 100
                                  CHECK (stop_loss_share_pct BETWEEN 1 AND 100),
    stop_loss_rate_per_s          integer NOT NULL DEFAULT 0 CHECK (stop_loss_rate_per_s >= 0),
    -- C2: the customer profile and expected consumption, for the reviewer.
    entity                        text NOT NULL DEFAULT '',
    payment_terms_days            integer NOT NULL DEFAULT 30 CHECK (payment_terms_days >= 0),
    expected_monthly_micros       bigint NOT NULL DEFAULT 0 CHECK (expected_monthly_micros >= 0),
    expected_peak_micros          bigint NOT NULL DEFAULT 0 CHECK (expected_peak_micros >= 0),
    expected_high_cost_share_pct  integer NOT NULL DEFAULT 0
                                  CHECK (expected_high_cost_share_pct BETWEEN 0 AND 100),
    created_at                    timestamptz NOT NULL DEFAULT now(),
    updated_at                    timestamptz NOT NULL DEFAULT now()
);
