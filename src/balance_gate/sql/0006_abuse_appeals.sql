-- Abuse appeals (P14): a customer who believes auto top-ups were triggered by
-- abuse appeals within 7 days; a confirmed appeal refunds the unconsumed credit
-- of every auto top-up of its window and pauses auto top-up.

CREATE TABLE abuse_appeals (
    appeal_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts,
    description  text NOT NULL,
    filed_at     timestamptz NOT NULL DEFAULT now(),
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'confirmed', 'rejected')),
    decided_at   timestamptz
);

-- One open appeal per account at a time.
CREATE UNIQUE INDEX abuse_appeals_one_open ON abuse_appeals (account_id) WHERE status = 'open';

-- The auto top-ups an appeal covers: those of the 7 days before it was filed.
CREATE TABLE abuse_appeal_top_ups (
    appeal_id  bigint NOT NULL REFERENCES abuse_appeals,
    top_up_id  bigint NOT NULL REFERENCES top_ups,
    refund_id  bigint REFERENCES refunds,
    PRIMARY KEY (appeal_id, top_up_id)
);
