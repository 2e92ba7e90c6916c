--[[
  Take money of one credit lot out of the hot balance, once: a refund (P13) or
  an expiry (O2). Never more than the lot still holds once the usage Redis has
  decided but Postgres has not yet burnt is burnt into the lots before it.
  Atomic.

  The caller holds the shard's exclusive lock in Postgres, so no flush is half
  done: 'unflushed' is exactly the usage the lots have not seen.

  KEYS[1] account hash    KEYS[2] this take's marker (its amount, once taken)

  ARGV[1] most to take (micro-USD)
  ARGV[2] open amount of the lot in Postgres
  ARGV[3] open amount of the lots burnt before it
  ARGV[4] marker TTL in seconds

  Usage not yet flushed burns the lots before this one first, then this one.
  Leased money may already be spent by a sidecar that has not reported it: it
  counts as spent. Only 'balance' pays; it never goes below 0 for a take.

  Returns {code, taken}
    0 OK           taken now (may be 0: nothing left to refund)
    3 NOT_LOADED   the account is not in Redis: load it and retry
    7 ALREADY      taken earlier under this marker: its amount
]]
local earlier = redis.call('GET', KEYS[2])
if earlier then
  return {7, tonumber(earlier)}
end
local account = redis.call('HMGET', KEYS[1], 'balance', 'unflushed', 'leased')
if not account[1] then
  return {3, 0}
end
local balance = tonumber(account[1])
local pending = tonumber(account[2]) + tonumber(account[3] or '0')
local open, before = tonumber(ARGV[2]), tonumber(ARGV[3])
local still_open = open - math.max(0, pending - before)
local take = math.max(0, math.min(tonumber(ARGV[1]), still_open, balance))
if take > 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', -take))
end
redis.call('SET', KEYS[2], string.format('%d', take), 'EX', ARGV[4])
return {0, take}
