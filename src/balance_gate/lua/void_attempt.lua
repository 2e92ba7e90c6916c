--[[
  Void one Authorize attempt that timed out under fail_closed (outage.py): its
  proxy was answered 'unavailable', so it must cost nothing, and it must undo
  nothing any other attempt was answered from. Atomic; idempotent (the outage
  journal may replay it). (lib/records.lua is prepended.)

  KEYS[1] account hash    KEYS[2] request record (lib/records.lua)
  KEYS[3] usage stream of the account's shard

  ARGV[1] the attempt's token   ARGV[2] request record TTL in s
  ARGV[3] account_id            ARGV[4] request_id

  No record: the attempt has not run (or never will): fence it with a voided
  record naming it, so that it debits nothing if it arrives late, while a retry
  (another attempt) is decided afresh. A voided record: add the attempt to it.
  A live record: the attempt is marked voided ('+' becomes '-'); if it was the
  last attempt answered from the record, no allowed answer relies on the debit:
  it is given back (a settle event of -authorized, final cost 0, for the record's generation)
  and the record becomes voided, one generation on. A pinned record (no '+') is
  left alone: a settled request, a lease or outage debit, an old record.

  Returns {code}
    0 DONE         nothing (left) to undo: voided before, or a pinned record
    1 FENCED       no decision stands; the attempt is fenced against a late arrival
    2 KEPT         another attempt was answered from this decision: it stands
    3 NOT_LOADED   the account is not in Redis: load it and retry
    4 UNDONE       the attempt's own debit was given back
]]
local raw = redis.call('GET', KEYS[2])
if not raw then
  redis.call('SET', KEYS[2], format_record({voided = true, gen = 0, answered = {},
    voided_attempts = {ARGV[1]}}), 'EX', ARGV[2])
  return {1}
end
local record = parse_record(raw)
if index_of(record.voided_attempts, ARGV[1]) then
  return {0}
end
if record.voided then
  add_voided_attempt(record, ARGV[1])
  redis.call('SET', KEYS[2], format_record(record), 'KEEPTTL')
  return {1}
end
if #record.answered == 0 then
  return {0}
end
local mine = index_of(record.answered, ARGV[1])
if mine then
  table.remove(record.answered, mine)
end
add_voided_attempt(record, ARGV[1])  -- not arrived yet: it must not count when it does
if #record.answered > 0 then
  redis.call('SET', KEYS[2], format_record(record), 'KEEPTTL')
  return {2}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {3}
end
-- Only this attempt was answered from the debit, and it was answered 'unavailable'.
local amount = tonumber(record.authorized)
if amount ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', record.authorized)
  redis.call('HINCRBY', KEYS[1], 'unflushed', string.format('%d', -amount))
end
redis.call('XADD', KEYS[3], '*', 'k', 's', 'a', ARGV[3], 'r',
  ledger_request_id(ARGV[4], record.gen), 'm', string.format('%d', -amount), 'c', '', 'f', '0')
redis.call('SET', KEYS[2], format_record({voided = true, gen = record.gen + 1, answered = {},
  voided_attempts = record.voided_attempts}), 'KEEPTTL')
return {4}
