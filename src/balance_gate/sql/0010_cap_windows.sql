-- Issue 13 item 6: the caps (P5, O1) hold across time-zone changes. For a while
-- after a change the caps also count rolling windows, which need the time of the
-- change and of each charge, by the service's clock (the one that dates local_day).

ALTER TABLE accounts
    -- When time_zone last changed to a different zone; NULL: never changed.
    ADD COLUMN time_zone_changed_at timestamptz;

ALTER TABLE top_ups
    -- When an auto top-up was planned, by the clock that chose its local_day
    -- (manual top-ups, which no cap counts: when the row was inserted).
    ADD COLUMN planned_at timestamptz;

UPDATE top_ups SET planned_at = created_at;

ALTER TABLE top_ups
    ALTER COLUMN planned_at SET DEFAULT now(),
    ALTER COLUMN planned_at SET NOT NULL;
