--[[
  Shared by the scripts that touch balance leases (balance_gate/leases.py),
  prepended to them when they are loaded.

  A sidecar may hold a lease: part of an account's balance moved out of
  'balance' into 'leased' (the sum over holders), recorded per holder in the
  account's lease hash as "<amount>:<expiry ms>". The holder authorizes from
  it in memory and reports usage in batches. Invariant:
      balance + leased + unflushed = ledger balance (credited - used)
  An expired lease (its holder died or stalled) goes back to the balance the
  next time a script looks.
]]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function reclaim_expired(account_key, leases_key, now)
  local held = redis.call('HGETALL', leases_key)
  local back = 0
  for i = 1, #held, 2 do
    local amount, expiry = string.match(held[i + 1], '^(%d+):(%d+)$')
    if tonumber(expiry) <= now then
      back = back + tonumber(amount)
      redis.call('HDEL', leases_key, held[i])
    end
  end
  if back > 0 then
    redis.call('HINCRBY', account_key, 'balance', string.format('%d', back))
    local leased = redis.call('HINCRBY', account_key, 'leased', string.format('%d', -back))
    if leased <= 0 then
      redis.call('HDEL', account_key, 'recall')
    end
  end
  return back
end
