-- What happened to each credit lot, and when (P15: the monthly report sums these).
-- Every change of a lot's consumed, refunded or expired part writes one row.

CREATE TABLE lot_movements (
    lot_id         bigint NOT NULL REFERENCES credit_lots,
    account_id     text NOT NULL REFERENCES accounts,
    -- consumed (negative when a settle gave usage back), refunded (negative when a
    -- gateway refused the refund), expired
    kind           text NOT NULL CHECK (kind IN ('consumed', 'refunded', 'expired')),
    amount_micros  bigint NOT NULL CHECK (amount_micros <> 0),
    at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX lot_movements_by_account ON lot_movements (account_id, at);

-- Every UPDATE of a lot's parts is recorded by this trigger, whoever makes it.
CREATE FUNCTION record_lot_movement() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.consumed_micros <> OLD.consumed_micros THEN
        INSERT INTO lot_movements (lot_id, account_id, kind, amount_micros)
        VALUES (NEW.lot_id, NEW.account_id, 'consumed', NEW.consumed_micros - OLD.consumed_micros);
    END IF;
    IF NEW.refunded_micros <> OLD.refunded_micros THEN
        INSERT INTO lot_movements (lot_id, account_id, kind, amount_micros)
        VALUES (NEW.lot_id, NEW.account_id, 'refunded', NEW.refunded_micros - OLD.refunded_micros);
    END IF;
    IF NEW.expired_micros <> OLD.expired_micros THEN
        INSERT INTO lot_movements (lot_id, account_id, kind, amount_micros)
        VALUES (NEW.lot_id, NEW.account_id, 'expired', NEW.expired_micros - OLD.expired_micros);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER credit_lots_movements AFTER UPDATE ON credit_lots
    FOR EACH ROW EXECUTE FUNCTION record_lot_movement();

-- A lot opened already consumed (it paid off unpaid usage, O3) records that too.
CREATE FUNCTION record_lot_opened() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.consumed_micros <> 0 THEN
        INSERT INTO lot_movements (lot_id, account_id, kind, amount_micros)
        VALUES (NEW.lot_id, NEW.account_id, 'consumed', NEW.consumed_micros);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER credit_lots_opened AFTER INSERT ON credit_lots
    FOR EACH ROW EXECUTE FUNCTION record_lot_opened();
