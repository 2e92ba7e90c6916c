-- Credit lots (issue 5): every positive credit is a lot that usage burns down,
-- soonest expiry first, then oldest first. Lot accounting happens when usage is
-- flushed, never on the hot path. Invariant, for every account:
--     sum(lot amount - consumed - refunded - expired) - unpaid = credited - used

ALTER TABLE credits DROP CONSTRAINT credits_kind_check;
ALTER TABLE credits ADD CONSTRAINT credits_kind_check
    CHECK (kind IN ('adjustment', 'top_up', 'promotion', 'refund', 'expiry'));

ALTER TABLE accounts
    -- Usage that no lot covered: the negative balance a top-up pays off first (O3).
    ADD COLUMN unpaid_micros bigint NOT NULL DEFAULT 0 CHECK (unpaid_micros >= 0),
    -- How long a new lot stays valid (O2); 0 = never expires.
    ADD COLUMN credit_validity_days integer NOT NULL DEFAULT 365
        CHECK (credit_validity_days >= 0);

CREATE TABLE credit_lots (
    lot_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts,
    credit_id        bigint NOT NULL UNIQUE REFERENCES credits,
    source           text NOT NULL CHECK (source IN ('adjustment', 'top_up', 'promotion')),
    amount_micros    bigint NOT NULL CHECK (amount_micros > 0),
    consumed_micros  bigint NOT NULL DEFAULT 0 CHECK (consumed_micros >= 0),
    refunded_micros  bigint NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    expired_micros   bigint NOT NULL DEFAULT 0 CHECK (expired_micros >= 0),
    purchased_at     timestamptz NOT NULL,
    expires_at       timestamptz,  -- NULL: never
    CONSTRAINT lot_not_overdrawn
        CHECK (consumed_micros + refunded_micros + expired_micros <= amount_micros)
);

-- The burn order: soonest expiry first (never-expiring lots last), then oldest.
CREATE INDEX credit_lots_open ON credit_lots (account_id, expires_at NULLS LAST, lot_id)
    WHERE consumed_micros + refunded_micros + expired_micros < amount_micros;

-- Burn `amount` (may be negative) into the account's lots; the caller holds the
-- account row lock. A positive amount consumes open lots in burn order, and what
-- no lot covers becomes unpaid. A negative amount (a settle that credits back)
-- pays unpaid usage back first, then un-consumes lots in reverse burn order (an
-- expired lot given something back is expired again by the next expiry run).
CREATE FUNCTION burn_down(p_account text, p_amount bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    left_over bigint := abs(p_amount);
    debt bigint;
    lot record;
    take bigint;
BEGIN
    IF p_amount > 0 THEN
        FOR lot IN
            SELECT lot_id, amount_micros - consumed_micros - refunded_micros - expired_micros AS open
            FROM credit_lots
            WHERE account_id = p_account
              AND consumed_micros + refunded_micros + expired_micros < amount_micros
            ORDER BY expires_at NULLS LAST, lot_id
            FOR UPDATE
        LOOP
            take := least(lot.open, left_over);
            UPDATE credit_lots SET consumed_micros = consumed_micros + take
            WHERE lot_id = lot.lot_id;
            left_over := left_over - take;
            EXIT WHEN left_over = 0;
        END LOOP;
        IF left_over > 0 THEN
            UPDATE accounts SET unpaid_micros = unpaid_micros + left_over
            WHERE account_id = p_account;
        END IF;
    ELSIF p_amount < 0 THEN
        SELECT unpaid_micros INTO debt FROM accounts WHERE account_id = p_account;
        take := least(debt, left_over);
        IF take > 0 THEN
            UPDATE accounts SET unpaid_micros = unpaid_micros - take WHERE account_id = p_account;
            left_over := left_over - take;
        END IF;
        FOR lot IN
            SELECT lot_id, consumed_micros FROM credit_lots
            WHERE account_id = p_account AND consumed_micros > 0
            ORDER BY expires_at DESC NULLS FIRST, lot_id DESC
            FOR UPDATE
        LOOP
            EXIT WHEN left_over = 0;
            take := least(lot.consumed_micros, left_over);
            UPDATE credit_lots SET consumed_micros = consumed_micros - take
            WHERE lot_id = lot.lot_id;
            left_over := left_over - take;
        END LOOP;
        IF left_over > 0 THEN
            RAISE EXCEPTION 'burn_down: % micros given back to % that no lot consumed',
                left_over, p_account;
        END IF;
    END IF;
END;
$$;

-- A new lot first pays off unpaid usage (O3): the caller holds the account row lock.
CREATE FUNCTION open_lot(p_account text, p_credit bigint, p_source text, p_amount bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    validity integer;
    debt bigint;
    paid bigint;
    new_lot bigint;
BEGIN
    SELECT credit_validity_days, unpaid_micros INTO validity, debt
    FROM accounts WHERE account_id = p_account;
    paid := least(debt, p_amount);
    INSERT INTO credit_lots (account_id, credit_id, source, amount_micros, consumed_micros,
                             purchased_at, expires_at)
    VALUES (p_account, p_credit, p_source, p_amount, paid, now(),
            CASE WHEN validity = 0 THEN NULL ELSE now() + make_interval(days => validity) END)
    RETURNING lot_id INTO new_lot;
    IF paid > 0 THEN
        UPDATE accounts SET unpaid_micros = unpaid_micros - paid WHERE account_id = p_account;
    END IF;
    RETURN new_lot;
END;
$$;

-- Lots for the credits that existed before this migration, oldest first, with
-- the usage recorded so far burnt into them.
DO $$
DECLARE
    c record;
    a record;
BEGIN
    FOR c IN SELECT credit_id, account_id, amount_micros, kind, created_at FROM credits
             WHERE amount_micros > 0 ORDER BY credit_id
    LOOP
        INSERT INTO credit_lots (account_id, credit_id, source, amount_micros, purchased_at,
                                 expires_at)
        VALUES (c.account_id, c.credit_id, c.kind, c.amount_micros, c.created_at,
                c.created_at + make_interval(days => 365));
    END LOOP;
    -- Usage and operator debits (negative credits) are what lots paid for.
    FOR a IN SELECT account_id, used_micros + coalesce(
                 (SELECT -sum(amount_micros) FROM credits k
                  WHERE k.account_id = accounts.account_id AND k.amount_micros < 0), 0) AS spent
             FROM accounts
    LOOP
        PERFORM burn_down(a.account_id, a.spent);
    END LOOP;
END;
$$;
