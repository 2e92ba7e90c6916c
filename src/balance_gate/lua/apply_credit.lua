--[[
  Apply a credit already committed in Postgres to the hot balance, exactly once.

  KEYS[1] account hash
  KEYS[2] the credit's marker (exists once the credit is in the hot balance)

  ARGV[1] amount (non-zero decimal integer string, may be negative)
  ARGV[2] marker TTL in seconds
  ARGV[3] largest safe balance (2^53-1)

  Returns {code, balance}
    0 OK               applied now
    3 NOT_LOADED       the account is not in Redis; its load will include the credit
    7 ALREADY_APPLIED  the marker exists: applied earlier (or counted by a load)
    8 OUT_OF_RANGE     the balance would leave +/- ARGV[3]; nothing applied
]]
local balance = redis.call('HGET', KEYS[1], 'balance')
if not balance then
  return {3, 0}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {7, tonumber(balance)}
end
local amount, limit = tonumber(ARGV[1]), tonumber(ARGV[3])
balance = tonumber(balance)
if (amount > 0 and balance > limit - amount) or (amount < 0 and balance < -limit - amount) then
  return {8, balance}
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return {0, redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])}
