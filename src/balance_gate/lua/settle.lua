--[[
  Record the final cost of an authorized request: debit or credit the difference
  to the authorized amount, once. Atomic. (lib/records.lua is prepended.)

  KEYS[1] account hash    KEYS[2] request record (lib/records.lua)
  KEYS[3] usage stream of the shard
  KEYS[4] the account's top-up trigger flag    KEYS[5] top-up trigger stream of the shard

  ARGV[1] final amount (decimal integer string, >= 0)
  ARGV[2] account_id      ARGV[3] request_id
  ARGV[4] lifetime of a trigger flag in seconds

  An extra debit that leaves the balance under the auto top-up threshold raises
  one trigger, as in authorize.lua. Balances are what the customer holds:
  balance + leased (lib/leases.lua). A settled record is pinned (its attempts
  are dropped): a proxy settled it, so no void may undo it. A voided record
  is no decision: REQUEST_NOT_FOUND.

  Returns {code, balance, delta, replayed}
    0 OK                 delta = final - authorized; replayed = 1 when settled before with
                         this same amount (nothing changed this time)
    3 NOT_LOADED         load the account and retry
    5 REQUEST_NOT_FOUND  no allowed request with that id (never seen, denied, voided, or
                         expired)
    6 ALREADY_SETTLED    settled before with another amount; delta slot carries that amount
]]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {3, 0, 0, 0}
end
local record = redis.call('GET', KEYS[2])
if not record then
  return {5, 0, 0, 0}
end

local decided = parse_record(record)
if decided.voided then
  return {5, 0, 0, 0}
end
local authorized, settled = decided.authorized, decided.settled
if settled ~= '' then
  if settled ~= ARGV[1] then
    return {6, 0, tonumber(settled), 0}
  end
  local held = redis.call('HMGET', KEYS[1], 'balance', 'leased')
  local balance = tonumber(held[1]) + tonumber(held[2] or '0')
  return {0, balance, tonumber(settled) - tonumber(authorized), 1}
end

local delta = tonumber(ARGV[1]) - tonumber(authorized)
local balance
if delta ~= 0 then
  -- Both operands are exact integers below 2^53, so '%d' prints them exactly.
  balance = redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', -delta))
  redis.call('HINCRBY', KEYS[1], 'unflushed', string.format('%d', delta))
else
  balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
end
redis.call('SET', KEYS[2], format_record({authorized = authorized, settled = ARGV[1],
  gen = decided.gen, answered = {}, voided_attempts = {}}), 'KEEPTTL')
local auto = redis.call('HMGET', KEYS[1], 'at_on', 'at_thr', 'leased')
balance = balance + tonumber(auto[3] or '0')
if auto[1] == '1' and balance < tonumber(auto[2]) then
  if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[4]) then
    redis.call('XADD', KEYS[5], '*', 'a', ARGV[2])
  end
end
-- 'f': the final cost, which the ledger settles against the authorization it holds
-- (issue 13 item 2: Redis's may be a duplicate the ledger reverted); 'm' is Redis's own.
redis.call('XADD', KEYS[3], '*', 'k', 's', 'a', ARGV[2], 'r', ledger_request_id(ARGV[3], decided.gen),
  'm', string.format('%d', delta), 'c', '', 'f', ARGV[1])
return {0, balance, delta, 0}
