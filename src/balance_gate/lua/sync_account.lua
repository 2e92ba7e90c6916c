--[[
  Load an account into Redis from the ledger, or reconcile its hot balance with it.
  The caller holds the shard's exclusive lock in Postgres, so no credit or usage
  flush for this shard is half-done while this runs.

  KEYS[1]    account hash
  KEYS[2..n] markers of the account's credits that Postgres has not yet seen
             applied: the ledger balance counts them, so they must never be
             applied again

  ARGV[1] mode: 'load' (only when missing) or 'reconcile'
  ARGV[2] ledger balance: credited - used as recorded in Postgres
  ARGV[3] status ('active' | 'disabled')
  ARGV[4] marker TTL in seconds
  ARGV[5] auto top-up on ('1' | '0')      ARGV[6] auto top-up threshold, micro-USD
  ARGV[7] floor: how low Authorize may take the balance (minus the credit limit, C1)
  ARGV[8] sl_at   ARGV[9] sl_caps   ARGV[10] sl_rate: the credit line's stop-loss
          (C4, see authorize.lua); '' when there is none

  Invariant kept: balance + leased + unflushed = ledger balance, because every
  debit moves an amount from balance (or a lease) to unflushed, and every
  acknowledged flush removes it from unflushed once it is in the ledger.
  'leased' is money that sidecars hold as leases (lib/leases.lua): it is not
  touched here; the returned balance is balance + leased.

  Returns {code, balance, correction}
    0 OK              loaded (correction 0) or reconciled (correction applied)
    9 ALREADY_LOADED  mode 'load' and the account is already in Redis
]]
local function set_stop_loss()
  for i, field in ipairs({'sl_at', 'sl_caps', 'sl_rate'}) do
    if ARGV[7 + i] == '' then
      redis.call('HDEL', KEYS[1], field)
    else
      redis.call('HSET', KEYS[1], field, ARGV[7 + i])
    end
  end
end

local function mark_credits()
  for i = 2, #KEYS do
    redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[4])
  end
end

local current = redis.call('HMGET', KEYS[1], 'balance', 'unflushed', 'leased')
if not current[1] then
  redis.call('HSET', KEYS[1], 'balance', ARGV[2], 'unflushed', '0', 'status', ARGV[3],
    'at_on', ARGV[5], 'at_thr', ARGV[6], 'floor', ARGV[7])
  set_stop_loss()
  mark_credits()
  return {0, tonumber(ARGV[2]), 0}
end
local leased = tonumber(current[3] or '0')
if ARGV[1] == 'load' then
  return {9, tonumber(current[1]) + leased, 0}
end

local expected = tonumber(ARGV[2]) - tonumber(current[2]) - leased
local correction = expected - tonumber(current[1])
local balance = tonumber(current[1])
if correction ~= 0 then
  balance = redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', correction))
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'at_on', ARGV[5], 'at_thr', ARGV[6],
  'floor', ARGV[7])
set_stop_loss()
mark_credits()
return {0, balance + leased, correction}
