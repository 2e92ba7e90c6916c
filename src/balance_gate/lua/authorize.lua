--[[
  Decide one proxied request: de-duplicate, check, debit, record usage. Atomic.
  (lib/leases.lua and lib/records.lua are prepended.)

  KEYS[1] account hash    {balance, unflushed, status, leased, recall, at_on, at_thr, floor}
  KEYS[2] request record  (lib/records.lua), expires after ARGV[3] s
  KEYS[3] usage stream of the account's shard
  KEYS[4] the account's "top-up triggered" flag (expires: a lost trigger never blocks)
  KEYS[5] top-up trigger stream of the account's shard
  KEYS[6] the account's lease hash (holder -> "<amount>:<expiry ms>")
  KEYS[7] the account's "auto top-up capped for now" flag (set by the top-up worker)

  ARGV[1] amount (decimal integer string, >= 0, <= 2^53-1)
  ARGV[2] the amount negated, as a string (never "-0": HINCRBY rejects it)
  ARGV[3] request record TTL in seconds
  ARGV[4] account_id      ARGV[5] request_id      ARGV[6] capability
  ARGV[7] lifetime of a trigger flag in seconds
  ARGV[8] most entries the usage stream may hold (Postgres away: usage waits there)
  ARGV[9] the low-balance warning level when auto top-up is off or paused
  ARGV[10] this attempt's token (unique per call the sidecar sends; '' or absent: none)

  Replays and voids (issue 12): the record names the attempts answered from it
  ('+'), so that a void (void_attempt.lua) of an attempt that timed out undoes
  only a debit no answered attempt relies on. A replay adds its own attempt
  (it was answered from the record). A voided record is no decision: the
  request is decided afresh, as the record's next generation; an attempt that
  was itself voided ('-') and arrives late is answered VOIDED and changes nothing.

  Balances returned are what the customer holds: balance + leased. A request
  is paid while the balance stays at or above 'floor' (0, or minus the credit
  line's limit, C1).
  A decision that leaves that under the auto top-up threshold (field at_thr,
  when at_on = '1') raises ONE trigger: only if the flag was not set. A denial
  raises it too (P9: the request fails, the top-up still starts).

  An allowed request that leaves the balance under the warning level with no
  top-up coming says so (low = 1): under at_thr while auto top-up is armed but
  capped (KEYS[7]), or under ARGV[9] while it is off or paused.

  Returns {code, balance, replayed, low}
    0  OK                    allowed (replayed = 1 when the request_id was already allowed)
    1  INSUFFICIENT_BALANCE  nothing debited, nothing recorded
    2  ACCOUNT_DISABLED      nothing debited, nothing recorded
    3  NOT_LOADED            the account is not in Redis: load it from Postgres and retry
    4  AMOUNT_MISMATCH       request_id already allowed for another amount; balance unchanged
    14 VOIDED                this attempt timed out and was voided before it arrived: its
                             caller was answered 'unavailable' long ago; nothing changed
    11 CAPABILITY_BLOCKED    C4 stop-loss: the balance after the debit would be at or
                             below 'sl_at' and the capability is in 'sl_caps'
                             ("|cap|cap|") or empty while 'sl_caps' is set
    12 RATE_LIMITED          C4 stop-loss: past it (as above), more than 'sl_rate'
                             requests per second
                             (a token bucket in 'sl_tokens' / 'sl_ms')
    13 BACKLOG_FULL          the usage stream holds ARGV[8] entries: a debit could not be
                             recorded, so nothing is debited
    10 LEASED                the balance cannot pay but leases hold money: their holders
                             are asked to return it ('recall'); retry shortly
]]
local account = redis.call('HMGET', KEYS[1], 'status', 'balance', 'at_on', 'at_thr', 'leased',
  'floor', 'sl_at', 'sl_caps', 'sl_rate')
local status = account[1]
if not status then
  return {3, 0, 0}
end
local balance = tonumber(account[2])
local leased = tonumber(account[5] or '0')
local floor = tonumber(account[6] or '0')

local function maybe_trigger(held)
  if account[3] == '1' and held < tonumber(account[4]) then
    if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[7]) then
      redis.call('XADD', KEYS[5], '*', 'a', ARGV[4])
    end
  end
end

local attempt = ARGV[10] or ''
local gen = 0
local voided_attempts = {}
local prior = redis.call('GET', KEYS[2])
if prior then
  local record = parse_record(prior)
  if attempt ~= '' and index_of(record.voided_attempts, attempt) then
    return {14, balance + leased, 0}
  end
  if not record.voided then
    if record.authorized ~= ARGV[1] then
      return {4, balance + leased, 0}
    end
    -- Answered from this decision: a void of the attempt that wrote it must keep it.
    -- A pinned record (no '+') stays pinned; past MAX_ANSWERED attempts it is pinned.
    if attempt ~= '' and #record.answered > 0 and not index_of(record.answered, attempt) then
      if #record.answered >= MAX_ANSWERED then
        record.answered = {}
      else
        record.answered[#record.answered + 1] = attempt
      end
      redis.call('SET', KEYS[2], format_record(record), 'KEEPTTL')
    end
    return {0, balance + leased, 1}
  end
  gen, voided_attempts = record.gen, record.voided_attempts
end

if status ~= 'active' then
  return {2, balance + leased, 0}
end
local amount = tonumber(ARGV[1])
-- C4: a request that would leave the balance at or past the stop-loss point is past
-- it: high-cost capabilities stop first, then the rate. On a line that names
-- high-cost capabilities, a request naming none is blocked too (it could be one).
-- The capability arrives normalized (validation.normalize_capability), as sl_caps.
if account[7] and balance + leased - amount <= tonumber(account[7]) then
  if account[8] and (ARGV[6] == '' or string.find(account[8], '|' .. ARGV[6] .. '|', 1, true)) then
    return {11, balance + leased, 0}
  end
  local rate = tonumber(account[9] or '0')
  if rate > 0 then
    local now = now_ms()
    local bucket = redis.call('HMGET', KEYS[1], 'sl_tokens', 'sl_ms')
    local tokens = tonumber(bucket[1] or rate)
    local since = tonumber(bucket[2] or now)
    tokens = math.min(rate, tokens + (now - since) * rate / 1000)
    if tokens < 1 then
      redis.call('HSET', KEYS[1], 'sl_tokens', tostring(tokens), 'sl_ms', now)
      return {12, balance + leased, 0}
    end
    redis.call('HSET', KEYS[1], 'sl_tokens', tostring(tokens - 1), 'sl_ms', now)
  end
end

if balance - amount < floor and leased > 0 then
  local back = reclaim_expired(KEYS[1], KEYS[6], now_ms())
  balance, leased = balance + back, leased - back
  if balance - amount < floor and leased > 0 then
    redis.call('HSET', KEYS[1], 'recall', '1')
    return {10, balance + leased, 0}
  end
end
if balance - amount < floor then
  maybe_trigger(balance + leased)
  return {1, balance + leased, 0}
end

if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[8]) then
  return {13, balance + leased, 0}
end
if amount ~= 0 then
  balance = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'unflushed', ARGV[1])
end
-- Written out rather than by format_record: this is the path every new request takes.
local record = ARGV[1]
if gen > 0 then
  record = record .. ';' .. string.format('%d', gen)
end
if attempt ~= '' then
  record = record .. '/+' .. attempt
end
for _, voided in ipairs(voided_attempts) do
  record = record .. '/-' .. voided
end
redis.call('SET', KEYS[2], record, 'EX', ARGV[3])
redis.call('XADD', KEYS[3], '*', 'k', 'a', 'a', ARGV[4], 'r', ledger_request_id(ARGV[5], gen),
  'm', ARGV[1], 'c', ARGV[6])
maybe_trigger(balance + leased)
local low = 0
if account[3] == '1' then
  if balance + leased < tonumber(account[4]) and redis.call('EXISTS', KEYS[7]) == 1 then
    low = 1
  end
elseif balance + leased < tonumber(ARGV[9]) then
  low = 1
end
return {0, balance + leased, 0, low}
