--[[
  Set fields of a loaded account (status, auto top-up switch and threshold);
  an account not in Redis picks them up when it is loaded.

  KEYS[1] account hash
  ARGV    field, value, field, value, ...

  Returns 1 when set, 0 when the account is not loaded.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
