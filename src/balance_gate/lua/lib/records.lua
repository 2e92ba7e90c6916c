--[[
  The request record, shared by the scripts that read or write one (authorize,
  settle, lease_report, void_attempt); prepended to them when they are loaded.

    live:    "<authorized>[:<settled>][;<gen>][/<entry>...]"
    voided:  "v[;<gen>][/<entry>...]"
    entry:   "+<attempt>"  an attempt answered from this decision (it wrote it or
                           replayed it): a void undoes the debit only once every
                           '+' attempt was voided (none was answered allowed)
             "-<attempt>"  an attempt that timed out and was voided: if it runs
                           late it debits nothing and counts for nothing

  Attempt tokens are hex, so '/', ';', ':', '+' and '-' never occur in one.
  Records of earlier versions ("<a>", "<a>:<s>") are live, generation 0, with no
  entries. A live record with no '+' entry is *pinned*: no void undoes it (an
  old record, a lease or fail_open debit, a settled request, or one replayed by
  more than MAX_ANSWERED attempts).

  A voided record means: no decision stands for this request id; the next
  attempt is decided afresh, as generation <gen>. A void that undid a debit
  bumps the generation, so that the ledger, which keys usage by
  (account, request id, kind), records the new decision as a new row:
  generation g > 0 is stored under "<request_id>\31<g>" (ids never hold a
  control character: validation.check_id).
]]
local MAX_ANSWERED = 4   -- '+' entries kept before the record is pinned
local MAX_VOIDED = 8     -- '-' entries kept; the oldest is forgotten first

local function parse_record(raw)
  local head, rest = string.match(raw, '^([^/]*)(.*)$')
  local body, gen = string.match(head, '^([^;]*);?(%d*)$')
  local record = {gen = tonumber(gen) or 0, answered = {}, voided_attempts = {}}
  if body == 'v' then
    record.voided = true
  else
    local authorized, settled = string.match(body, '^(%d+):?(%d*)$')
    record.authorized, record.settled = authorized, settled
  end
  for sign, attempt in string.gmatch(rest, '/([+-])([^/]+)') do
    if sign == '+' then
      record.answered[#record.answered + 1] = attempt
    else
      record.voided_attempts[#record.voided_attempts + 1] = attempt
    end
  end
  return record
end

local function format_record(record)
  local parts = {}
  if record.voided then
    parts[1] = 'v'
  elseif record.settled ~= nil and record.settled ~= '' then
    parts[1] = record.authorized .. ':' .. record.settled
  else
    parts[1] = record.authorized
  end
  if record.gen > 0 then
    parts[#parts + 1] = ';' .. string.format('%d', record.gen)
  end
  for _, attempt in ipairs(record.answered) do
    parts[#parts + 1] = '/+' .. attempt
  end
  for _, attempt in ipairs(record.voided_attempts) do
    parts[#parts + 1] = '/-' .. attempt
  end
  return table.concat(parts)
end

local function index_of(list, value)
  for i, item in ipairs(list) do
    if item == value then
      return i
    end
  end
  return nil
end

local function add_voided_attempt(record, attempt)
  if index_of(record.voided_attempts, attempt) then
    return
  end
  if #record.voided_attempts >= MAX_VOIDED then
    table.remove(record.voided_attempts, 1)
  end
  record.voided_attempts[#record.voided_attempts + 1] = attempt
end

-- The request id the ledger (usage_events) records a generation's usage under.
local function ledger_request_id(request_id, gen)
  if gen == 0 then
    return request_id
  end
  return request_id .. '\31' .. string.format('%d', gen)
end
