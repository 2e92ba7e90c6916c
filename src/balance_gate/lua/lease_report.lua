--[[
  A lease holder reports what it allowed, renews its lease, and may return it.
  Atomic. (lib/leases.lua and lib/records.lua are prepended.)

  KEYS[1] account hash      KEYS[2] the account's lease hash
  KEYS[3] usage stream of the account's shard
  KEYS[4] the account's top-up trigger flag   KEYS[5] top-up trigger stream
  KEYS[6..n] request record of entry i-5

  ARGV[1] holder   ARGV[2] lease lifetime in ms   ARGV[3] '1': return the whole lease
  ARGV[4] account_id   ARGV[5] request record TTL in s   ARGV[6] trigger flag TTL in s
  then per entry three values: request_id, amount, capability

  Each entry is recorded once across all sidecars: if a live request record
  already exists (another sidecar, or the normal path, decided it), it is not
  charged again and its amount stays in the lease: the holder adds it back;
  the record is pinned (this allowed answer relies on it: no void may undo it).
  A voided record (lib/records.lua) is no decision: the entry is recorded and
  charged as the record's next generation. Records written here name no
  attempt: pinned.
  Usage is paid from the holder's lease; if the lease is gone (it expired and
  was reclaimed), from the balance.

  The renewal checks status and floor: on an account that is not 'active' the
  whole lease comes back, and otherwise the part the balance lacks below the
  floor (after a cut that raised it, even one a load wrote with no recall).

  When the account is not in Redis at all (Redis lost it), the entries are
  still recorded in the stream, which is what a load from the ledger expects
  of usage not yet flushed (as after any debit), and the lease is reported gone.

  Returns {balance + leased, the holder's lease now, recall pending (0/1),
           duplicate request ids...}
]]
local used = 0
local duplicates = {}

local function record_entries()
  for i = 6, #KEYS do
    local at = 3 * (i - 6) + 7
    local request_id, amount = ARGV[at], ARGV[at + 1]
    local prior = redis.call('GET', KEYS[i])
    local gen, voided_attempts = 0, {}
    if prior then
      local record = parse_record(prior)
      if record.voided then
        gen, voided_attempts = record.gen, record.voided_attempts
        prior = nil
      elseif #record.answered > 0 then
        record.answered = {}
        redis.call('SET', KEYS[i], format_record(record), 'KEEPTTL')
      end
    end
    if prior then
      duplicates[#duplicates + 1] = request_id
    else
      redis.call('SET', KEYS[i], format_record({authorized = amount, gen = gen, answered = {},
        voided_attempts = voided_attempts}), 'EX', ARGV[5])
      redis.call('XADD', KEYS[3], '*', 'k', 'a', 'a', ARGV[4], 'r',
        ledger_request_id(request_id, gen), 'm', amount, 'c', ARGV[at + 2])
      used = used + tonumber(amount)
    end
  end
end

local function reply_with(total, held, recall)
  local reply = {total, held, recall}
  for _, request_id in ipairs(duplicates) do
    reply[#reply + 1] = request_id
  end
  return reply
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  record_entries()
  redis.call('DEL', KEYS[2])
  return reply_with(0, 0, 0)
end

local now = now_ms()
reclaim_expired(KEYS[1], KEYS[2], now)
local mine = redis.call('HGET', KEYS[2], ARGV[1])
local held = 0
if mine then
  held = tonumber(string.match(mine, '^(%d+):'))
end
record_entries()

local from_lease = math.min(used, held)
held = held - from_lease
if used > 0 then
  redis.call('HINCRBY', KEYS[1], 'unflushed', string.format('%d', used))
end
if used > from_lease then  -- the lease was gone: the balance pays
  redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', from_lease - used))
end

-- A renewal checks status and floor (issue 13 item 5): a disabled account gets
-- none (the whole lease comes back), and the lease keeps only money above the
-- floor: what the balance lacks below it comes back first (a cut raised it).
local state = redis.call('HMGET', KEYS[1], 'status', 'balance', 'floor')
local returned = 0
if ARGV[3] == '1' or state[1] ~= 'active' then
  returned = held
else
  local below_floor = tonumber(state[3] or '0') - tonumber(state[2])
  returned = math.max(0, math.min(held, below_floor))
end
held = held - returned
if from_lease + returned > 0 then
  redis.call('HINCRBY', KEYS[1], 'leased', string.format('%d', -(from_lease + returned)))
end
if returned > 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', returned))
end
if held > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], string.format('%d:%d', held, now + tonumber(ARGV[2])))
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end

local account = redis.call('HMGET', KEYS[1], 'balance', 'leased', 'recall', 'at_on', 'at_thr')
local leased = tonumber(account[2] or '0')
local recall = account[3] and 1 or 0
if leased <= 0 and recall == 1 then
  redis.call('HDEL', KEYS[1], 'recall')
  recall = 0
end
local total = tonumber(account[1]) + leased
if account[4] == '1' and total < tonumber(account[5]) then
  if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[6]) then
    redis.call('XADD', KEYS[5], '*', 'a', ARGV[4])
  end
end
return reply_with(total, held, recall)
