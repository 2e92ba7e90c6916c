--[[
  After the flusher committed usage events to Postgres: acknowledge them, take
  their amounts out of each account's 'unflushed' total (once: only when XACK
  says the entry was still pending), and delete them from the stream.

  KEYS[1]    usage stream of one shard
  KEYS[2..n] account hash of entry i-1

  ARGV[1]         consumer group
  ARGV[2i], ARGV[2i+1]  entry id and its amount negated (decimal string), i = 1..n-1

  Returns the number of entries acknowledged now.
]]
local acked = 0
for i = 2, #KEYS do
  local id, negated = ARGV[2 * (i - 1)], ARGV[2 * (i - 1) + 1]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    acked = acked + 1
    if negated ~= '0' and redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('HINCRBY', KEYS[i], 'unflushed', negated)
    end
  end
  redis.call('XDEL', KEYS[1], id)
end
return acked
