-- C3: credit line reviews, opened when due or early when a trigger fires.

ALTER TABLE invoices
    ADD COLUMN overdue boolean NOT NULL DEFAULT false,
    ADD COLUMN paid_at timestamptz;

CREATE TABLE credit_reviews (
    review_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts,
    -- scheduled (next_review_on came), overdue_invoices, usage_surge, high_cost_share
    reason           text NOT NULL
                     CHECK (reason IN ('scheduled', 'overdue_invoices', 'usage_surge',
                                       'high_cost_share')),
    detail           text NOT NULL,
    opened_at        timestamptz NOT NULL DEFAULT now(),
    limit_before     bigint NOT NULL,
    -- Set when opening the review cut the limit (credit_review_auto_cut_pct).
    limit_cut_to     bigint,
    status           text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    closed_at        timestamptz,
    decision         text,
    new_limit        bigint
);

-- One open review per account: the daily job is safe on every sidecar.
CREATE UNIQUE INDEX credit_reviews_one_open ON credit_reviews (account_id) WHERE status = 'open';
