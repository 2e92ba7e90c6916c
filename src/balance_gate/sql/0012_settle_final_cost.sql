-- Issue 13 item 2: a settle sets its request's final cost against the authorization
-- the ledger holds, which need not be the one Redis settled against (a request id
-- decided again after its record expired, then settled or voided). The settle row
-- keeps that cost: amount_micros = final_micros - the authorize row's amount (none
-- yet: 0, and an authorize recorded after it is booked at 0). NULL on settles
-- written by earlier versions, whose amount is Redis's difference, capped so that
-- the request never costs less than 0.
ALTER TABLE usage_events ADD COLUMN final_micros bigint
    CHECK (final_micros IS NULL OR (kind = 'settle' AND final_micros >= 0));
