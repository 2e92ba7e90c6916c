--[[
  Set fields of a loaded account (status, auto top-up switch and threshold);
  an account not in Redis picks them up when it is loaded.

  KEYS[1] account hash
  ARGV    field, value, field, value, ...  (an empty value removes the field)

  A status other than 'active' also recalls the account's leases
  (lib/leases.lua), so sidecars stop allowing from memory within a report
  interval or so.

  Returns 1 when set, 0 when the account is not loaded.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local state = redis.call('HMGET', KEYS[1], 'status', 'leased')
if state[1] ~= 'active' and tonumber(state[2] or '0') > 0 then
  redis.call('HSET', KEYS[1], 'recall', '1')
end
return 1
