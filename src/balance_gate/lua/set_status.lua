--[[
  Set a loaded account's status; an account not in Redis picks it up on load.

  KEYS[1] account hash
  ARGV[1] status ('active' | 'disabled')

  Returns 1 when set, 0 when the account is not loaded.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
