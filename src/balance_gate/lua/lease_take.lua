--[[
  Grant (or enlarge) this sidecar's lease on an account's balance. Atomic.
  (lib/leases.lua is prepended.)

  KEYS[1] account hash    KEYS[2] the account's lease hash

  ARGV[1] holder (the sidecar's id)
  ARGV[2] wanted amount   ARGV[3] smallest grant worth having
  ARGV[4] lease lifetime in ms (the holder stops using it earlier)

  Leases stay away from the floor (0, or minus a credit line's limit, or the
  line's stop-loss point when set): a grant is at most half of what the
  balance holds above it, so as the balance falls leases shrink, and none is granted while
  a recall is pending or the account is not active. Only a grant renews the
  holder's lease; a refused one on a disabled account, or one whose leases hold
  money below the floor, raises the recall (issue 13 item 5).

  Returns {granted, balance + leased, the holder's lease now, sl_at, sl_caps}
    granted = -1 when the account is not in Redis (NOT_LOADED)
    sl_at, sl_caps: the line's stop-loss point and high-cost capabilities ('' : none),
    so that the holder leaves to authorize.lua what the stop-loss could block (C4)
]]
local account = redis.call('HMGET', KEYS[1], 'status', 'balance', 'leased', 'recall', 'floor',
  'sl_at', 'sl_caps')
if not account[1] then
  return {-1, 0, 0}
end
local now = now_ms()
local back = reclaim_expired(KEYS[1], KEYS[2], now)
local balance = tonumber(account[2]) + back
local leased = tonumber(account[3] or '0') - back
if leased <= 0 then
  account[4] = false  -- reclaim_expired cleared a pending recall
end

local mine = redis.call('HGET', KEYS[2], ARGV[1])
local held = 0
if mine then
  held = tonumber(string.match(mine, '^(%d+):'))
end

-- Leases never reach into a credit line's stop-loss zone (C4), where the script
-- must see each request's capability: they stay above 'sl_at' when it is set.
local lowest = tonumber(account[6] or account[5] or '0')
local free = balance - lowest
local grant = math.min(tonumber(ARGV[2]), math.floor(free / 2))
if account[1] ~= 'active' or account[4] or grant < tonumber(ARGV[3]) then
  grant = 0
end
if grant > 0 then
  balance = redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', -grant))
  leased = redis.call('HINCRBY', KEYS[1], 'leased', string.format('%d', grant))
  held = held + grant
  -- Only a grant renews: a refused one never extends a lease (issue 13 item 5).
  redis.call('HSET', KEYS[2], ARGV[1], string.format('%d:%d', held, now + tonumber(ARGV[4])))
elseif leased > 0 and (account[1] ~= 'active' or balance < tonumber(account[5] or '0')) then
  -- Disabled, or leases hold money below the floor (a cut a load wrote): ask them back.
  redis.call('HSET', KEYS[1], 'recall', '1')
end
return {grant, balance + leased, held, account[6] or '', account[7] or ''}
