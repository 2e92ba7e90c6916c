--[[
  Set fields of a loaded account (status, auto top-up switch and threshold,
  a credit line's floor and stop-loss); an account not in Redis picks them up
  when it is loaded.

  KEYS[1] account hash
  ARGV    field, value, field, value, ...  (an empty value removes the field)

  A cut recalls the account's leases (lib/leases.lua) in this same write, so
  sidecars stop allowing from memory at their next report (issue 13 item 5):
  a status other than 'active', a floor raised (a credit limit lowered), a
  stop-loss point raised or changed high-cost capabilities (C4: a lease
  decides with the line of its last grant).

  Returns 0 when the account is not loaded, 1 when set, 2 when set and the
  leases recalled (the sidecar that made the cut returns its own lease at once).
]]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local LINE = {'floor', 'sl_at', 'sl_caps'}
local function line_state()
  local values = redis.call('HMGET', KEYS[1], unpack(LINE))
  local floor = tonumber(values[1] or '0')
  return {floor = floor, lowest = tonumber(values[2] or values[1] or '0'), caps = values[3] or ''}
end

local before = line_state()
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local after = line_state()
local state = redis.call('HMGET', KEYS[1], 'status', 'leased')
local cut = state[1] ~= 'active' or after.floor > before.floor or after.lowest > before.lowest
  or after.caps ~= before.caps
if cut and tonumber(state[2] or '0') > 0 then
  redis.call('HSET', KEYS[1], 'recall', '1')
  return 2
end
return 1
