-- Usage events the ledger refused (issue 13 item 3): a poison event is set aside
-- here with the reason, undone in Redis, and every other event keeps flowing.
-- No foreign key: an event naming an account the ledger lacks must fit here too.
CREATE TABLE usage_dead_letters (
    dead_letter_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      text NOT NULL,
    request_id      text NOT NULL,
    kind            text NOT NULL,
    amount_micros   bigint NOT NULL,
    capability      text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    shard           integer NOT NULL,
    stream_entry_id text NOT NULL,
    -- What Postgres said (SQLSTATE and message) when the event was recorded alone.
    sqlstate        text NOT NULL,
    reason          text NOT NULL,
    set_aside_at    timestamptz NOT NULL DEFAULT now(),
    -- A flusher that crashed before acknowledging sets the same entry aside once.
    UNIQUE (account_id, request_id, kind, stream_entry_id)
);
