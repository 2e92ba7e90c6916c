--[[
  After the flusher committed usage events to Postgres: acknowledge them, take
  their amounts out of each account's 'unflushed' total (once: only when XACK
  says the entry was still pending), and delete them from the stream.

  An entry whose request the ledger already had from another entry (Redis lost
  its request record and decided a retry again) is also given back to the
  balance, and so is the difference of an entry the ledger booked at another
  amount (a settle priced against the ledger's authorization: issue 13 item 2),
  so the hot balance keeps matching the ledger (P2).

  KEYS[1]    usage stream of one shard
  KEYS[2..n] account hash of entry i-1

  ARGV[1]  consumer group
  then per entry i = 1..n-1, three values starting at ARGV[3i-1]:
    entry id, its amount negated, the amount to give back to the balance ("0" when
    none; negative when the ledger booked more than the entry took)
    (decimal strings; never "-0")

  Returns the number of entries acknowledged now.
]]
local acked = 0
for i = 2, #KEYS do
  local at = 3 * (i - 1) - 1
  local id, negated, refund = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    acked = acked + 1
    if redis.call('EXISTS', KEYS[i]) == 1 then
      if negated ~= '0' then
        redis.call('HINCRBY', KEYS[i], 'unflushed', negated)
      end
      if refund ~= '0' then
        redis.call('HINCRBY', KEYS[i], 'balance', refund)
      end
    end
  end
  redis.call('XDEL', KEYS[1], id)
end
return acked
