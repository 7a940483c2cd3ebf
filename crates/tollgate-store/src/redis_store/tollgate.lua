--[[
The Redis side of the charge protocol: every operation is ONE call of this script, so each step
is atomic (DESIGN "reserve → settle"). ARGV[1] names the operation; ARGV[2] is the key base of
the account's shard, "<prefix>:{<prefix>:<shard>}", so every key below carries the shard's hash
tag and a call touches one cluster slot. KEYS[1] is the key the call is routed by (the account
hash, or the shard's hold-expiry set for `expire`).

Keys (B = key base, A = account id, K = key id, R = request id):
  B:acct:A                 hash  balance, held, fund_seq          no TTL: the hot balance is state
  B:holds:A                hash  R -> "amount|K|day|month"         no TTL: released by settle/void/expire
  B:withdrawals:A          hash  W -> amount                       no TTL: released by apply_fund/expire
  B:hold_expiry            zset  "A\nR" (a hold) or "A\n\nW" (a      no TTL: emptied by expire
                           withdrawal) scored by expiry (ms)
  B:charged:A:R            the charge's time, the key and request  TTL 24 h: the worker's lag it covers;
                           it is bound to and the response to       the worker's ack deletes it (the
                           replay, until the ledger has them        ledger has it all then)
                           (redis hot.rs encode_charged)
  B:recent:A:<bucket>      set of request ids charged in the        TTL: the bucket's end + the window
                           bucket (RECENT_BUCKET_MS) of their       (`recent_charge_ms`, hot.rs
                           settle, or loaded from the ledger then   RECENT_CHARGE_MS)
  B:day:A:<day>, B:month:A:<month>        request counters          TTL past their period
  B:key:K                  hash  held, spent_total                 no TTL: a budget never resets
  B:key:K:spent_day:<day>, B:key:K:spent_month:<month>             TTL past their period
  B:key:K:rpm:<minute>, B:key:K:tpm:<minute>                       TTL 120 s
  B:usage                  stream of usage events for the worker   trimmed by the worker's acks
  B:unlogged:A             hash  R -> cost: charges whose event    no TTL: the worker's ack takes each
                           the ledger may not have (stream or      out; kept by unload (still owed:
                           dead letters)                           operations::load_snapshot)

Money is integer nano-units. Every change goes through HINCRBY/INCRBY (exact 64-bit integers in
Redis); Lua compares them as doubles, exact up to 2^53 nano-units (9,007,199 currency units), so
every amount a call reads or receives is checked against that range and refused beyond it.
Time comes from the server's TIME, periods are UTC (as crates/tollgate-store/src/clock.rs).
A test may fix the time instead: ARGV[1] is then "<operation>@<ms since the epoch>" (redis
hot.rs `with_clock`), and that moment decides every period and hold expiry of the call, as an
injected clock does for the in-process store. Production sends the bare name and pays nothing
for this but the one table lookup it always made. Key TTLs stay Redis's own (real time).
--]]

-- 2^53: amounts stay within ±(2^53 − 1), tollgate-core's Money::HOT_STORE_MAX, which the ledger
-- and the operator API check before anything reaches this script.
local MONEY_MAX = 9007199254740992
-- Every negation is written `0 - x`: Lua's -x of a zero is -0, formatted "-0", which HINCRBY
-- refuses, so a hold or a cost of zero (a free model) failed its settle, void and expiry.
-- A charge's record outlives the worker's lag (24 h) until the ledger has it.
local QUEUED_CHARGE_TTL_MS = 86400000
-- Charged ids are remembered `window` ms after their settle (each call that needs it passes
-- `recent_charge_ms`), as members of one set per account and bucket of this many ms: a set
-- member costs about half a key of its own with its TTL, and a bucket expires whole. Fixed,
-- not derived from the window: gateways configured with different windows still read each
-- other's buckets.
local RECENT_BUCKET_MS = 120000

-- The moment a test fixed for this call (see the header), or nil: the server's TIME.
local fixed_now_ms = nil

local function now_ms()
  if fixed_now_ms then return fixed_now_ms end
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

local function recent_key(base, account, bucket)
  return base .. ':recent:' .. account .. ':' .. string.format('%d', bucket)
end

-- Whether request_id was charged: still queued for the ledger (its record), or settled within
-- `window` ms before `now` (every bucket that may hold it, and the next one: a server clock
-- stepped back by up to a bucket still finds what it settled before the step).
local function charged_recently(base, account, request_id, now, window)
  if redis.call('EXISTS', base .. ':charged:' .. account .. ':' .. request_id) == 1 then return true end
  local newest, oldest = math.floor(now / RECENT_BUCKET_MS), math.floor((now - window) / RECENT_BUCKET_MS)
  for bucket = newest + 1, oldest, -1 do
    if redis.call('SISMEMBER', recent_key(base, account, bucket), request_id) == 1 then return true end
  end
  return false
end

-- Remembers request_id as charged at `now` until at least `now + window`: its bucket lives to
-- the bucket's end + window (never shortened by a caller with a shorter window).
local function remember_charge(base, account, request_id, now, window)
  local bucket = math.floor(now / RECENT_BUCKET_MS)
  local key = recent_key(base, account, bucket)
  redis.call('SADD', key, request_id)
  local ttl = (bucket + 1) * RECENT_BUCKET_MS + window - now
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end

local function checked(value)
  local number = tonumber(value)
  if number == nil or number >= MONEY_MAX or number <= -MONEY_MAX then
    return error('money_out_of_range')
  end
  return number
end

-- Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
local function days_from_civil(year, month, day)
  if month <= 2 then year = year - 1 end
  local era = math.floor(year / 400)
  local year_of_era = year - era * 400
  local shifted_month = (month + 9) % 12
  local day_of_year = math.floor((153 * shifted_month + 2) / 5) + day - 1
  local day_of_era = year_of_era * 365 + math.floor(year_of_era / 4) - math.floor(year_of_era / 100) + day_of_year
  return era * 146097 + day_of_era - 719468
end

local function civil_from_days(days)
  days = days + 719468
  local era = math.floor(days / 146097)
  local day_of_era = days - era * 146097
  local year_of_era = math.floor((day_of_era - math.floor(day_of_era / 1460) + math.floor(day_of_era / 36524) - math.floor(day_of_era / 146096)) / 365)
  local year = year_of_era + era * 400
  local day_of_year = day_of_era - (365 * year_of_era + math.floor(year_of_era / 4) - math.floor(year_of_era / 100))
  local shifted_month = math.floor((5 * day_of_year + 2) / 153)
  local month = shifted_month < 10 and shifted_month + 3 or shifted_month - 9
  if month <= 2 then year = year + 1 end
  return year, month
end

local function periods(now)
  local minute = math.floor(now / 60000)
  local day = math.floor(now / 86400000)
  local year, month = civil_from_days(day)
  local next_year, next_month = year, month + 1
  if next_month == 13 then next_year, next_month = year + 1, 1 end
  local next_month_ms = days_from_civil(next_year, next_month, 1) * 86400000
  local function seconds_until(end_ms) return math.ceil((end_ms - now) / 1000) end
  return {
    minute = minute, day = day, month = year * 12 + month - 1,
    to_minute = seconds_until((minute + 1) * 60000),
    to_day = seconds_until((day + 1) * 86400000),
    to_month = seconds_until(next_month_ms),
  }
end

local function number_or_zero(value) return tonumber(value) or 0 end

-- Adds to a period counter; its TTL is set when the call creates it (the value then equals
-- `by`), not on every call: each write is one more AOF entry fsynced before the reply.
local function count(key, by, ttl_ms)
  if redis.call('INCRBY', key, by) == by then redis.call('PEXPIRE', key, ttl_ms) end
end

-- Returns a hold's funds and its request-count slot (as memory.rs `release`).
local function release(base, account, request_id, hold, now_periods)
  local amount, key_id, day, month = string.match(hold, '^(-?%d+)|(.*)|(-?%d+)|(-?%d+)$')
  redis.call('HINCRBY', base .. ':acct:' .. account, 'held', 0 - tonumber(amount))
  redis.call('HINCRBY', base .. ':key:' .. key_id, 'held', 0 - tonumber(amount))
  if tonumber(day) == now_periods.day then
    local day_key = base .. ':day:' .. account .. ':' .. day
    if number_or_zero(redis.call('GET', day_key)) > 0 then redis.call('DECR', day_key) end
  end
  if tonumber(month) == now_periods.month then
    local month_key = base .. ':month:' .. account .. ':' .. month
    if number_or_zero(redis.call('GET', month_key)) > 0 then redis.call('DECR', month_key) end
  end
  redis.call('HDEL', base .. ':holds:' .. account, request_id)
  redis.call('ZREM', base .. ':hold_expiry', account .. '\n' .. request_id)
end

-- Returns a withdrawal's funds (as memory.rs `release_withdrawal`). An account not loaded has
-- no balance to return them to: its hash is never created here (a hash without a balance would
-- read as loaded to `load` and block the account for good).
local function release_withdrawal(base, account, withdrawal_id)
  local withdrawals_key = base .. ':withdrawals:' .. account
  local amount = redis.call('HGET', withdrawals_key, withdrawal_id)
  if amount then
    local account_key = base .. ':acct:' .. account
    if redis.call('EXISTS', account_key) == 1 then
      redis.call('HINCRBY', account_key, 'held', 0 - tonumber(amount))
    end
    redis.call('HDEL', withdrawals_key, withdrawal_id)
  end
  redis.call('ZREM', base .. ':hold_expiry', account .. '\n\n' .. withdrawal_id)
end

local operations = {}

-- Routing pins (issue 23): <base>:pin:<account>:<session> = "<generation>|<channel>", with the
-- pin's TTL; a pin counts only while its generation is the account's (<base>:pingen:<account>,
-- absent = 0), so `clear_pins` forgets every pin of an account in one step.
local function pin_generation(base, account)
  return redis.call('GET', base .. ':pingen:' .. account) or '0'
end

-- ARGV: op, base, account, key, request_id, hold, hold_tokens, ttl_ms, credit_limit,
--       daily_quota, monthly_quota, budget_daily, budget_monthly, budget_total, rpm, tpm
--       (absent limits are ""), recent_charge_ms, session ("" for none).
-- Reply: {"held", available_after, pinned channel or ""} or {"refused", reason, value, value}.
-- Keeps I3: a hold is placed only if balance + credit − held ≥ hold; nothing changes on refusal.
function operations.authorize(base, argv)
  local account, key_id, request_id = argv[3], argv[4], argv[5]
  local hold, hold_tokens, ttl_ms, credit = checked(argv[6]), tonumber(argv[7]), tonumber(argv[8]), checked(argv[9])
  local account_key = base .. ':acct:' .. account
  local state = redis.call('HMGET', account_key, 'balance', 'held')
  if not state[1] then return {'refused', 'not_loaded'} end
  local balance, held = checked(state[1]), checked(state[2] or 0)
  local now = now_ms()
  if charged_recently(base, account, request_id, now, tonumber(argv[17])) then return {'refused', 'already_charged'} end
  if redis.call('HEXISTS', base .. ':holds:' .. account, request_id) == 1 then return {'refused', 'in_progress'} end
  local p = periods(now)
  local key_base = base .. ':key:' .. key_id
  local rpm_key, tpm_key = key_base .. ':rpm:' .. p.minute, key_base .. ':tpm:' .. p.minute
  if argv[15] ~= '' and number_or_zero(redis.call('GET', rpm_key)) >= tonumber(argv[15]) then return {'refused', 'rate', p.to_minute} end
  if argv[16] ~= '' and number_or_zero(redis.call('GET', tpm_key)) >= tonumber(argv[16]) then return {'refused', 'rate', p.to_minute} end
  local day_key, month_key = base .. ':day:' .. account .. ':' .. p.day, base .. ':month:' .. account .. ':' .. p.month
  if argv[10] ~= '' and number_or_zero(redis.call('GET', day_key)) >= tonumber(argv[10]) then return {'refused', 'daily', p.to_day} end
  if argv[11] ~= '' and number_or_zero(redis.call('GET', month_key)) >= tonumber(argv[11]) then return {'refused', 'monthly', p.to_month} end
  local key_held = checked(redis.call('HGET', key_base, 'held') or 0)
  local budgets = {
    {'daily', argv[12], key_base .. ':spent_day:' .. p.day, p.to_day},
    {'monthly', argv[13], key_base .. ':spent_month:' .. p.month, p.to_month},
    {'total', argv[14], nil, -1},
  }
  for _, budget in ipairs(budgets) do
    if budget[2] ~= '' then
      local spent
      if budget[3] then spent = checked(redis.call('GET', budget[3]) or 0) else spent = checked(redis.call('HGET', key_base, 'spent_total') or 0) end
      if spent + key_held + hold > checked(budget[2]) then return {'refused', 'budget', budget[1], budget[4]} end
    end
  end
  local available = balance + credit - held
  if available < hold then return {'refused', 'insufficient', string.format('%d', available), string.format('%d', hold)} end
  redis.call('HINCRBY', account_key, 'held', hold)
  redis.call('HINCRBY', key_base, 'held', hold)
  redis.call('HSET', base .. ':holds:' .. account, request_id, string.format('%d|%s|%d|%d', hold, key_id, p.day, p.month))
  redis.call('ZADD', base .. ':hold_expiry', now + ttl_ms, account .. '\n' .. request_id)
  count(day_key, 1, 2 * 86400000)
  count(month_key, 1, 32 * 86400000)
  count(rpm_key, 1, 120000)
  count(tpm_key, hold_tokens, 120000)
  local pinned = ''
  if argv[18] and argv[18] ~= '' then
    local pin = redis.call('GET', base .. ':pin:' .. account .. ':' .. argv[18])
    if pin then
      local generation, channel = string.match(pin, '^(%d+)|(.*)$')
      if generation == pin_generation(base, account) then pinned = channel end
    end
  end
  return {'held', string.format('%d', available - hold), pinned}
end

-- ARGV: op, base, account, key, request_id, cost, event_json, charged record ("" for "1"),
-- recent_charge_ms, then for a success to pin: session, channel, pin ttl_ms ("" for none).
-- Reply: {"settled", before, after} or {"already", balance}.
-- Keeps I1: the charge and its usage event (XADD) happen in this one call, or neither does.
function operations.settle(base, argv)
  local account, key_id, request_id, cost, event = argv[3], argv[4], argv[5], checked(argv[6]), argv[7]
  local account_key = base .. ':acct:' .. account
  local balance = redis.call('HGET', account_key, 'balance')
  if not balance then return error('account_not_loaded') end
  local charged_key = base .. ':charged:' .. account .. ':' .. request_id
  local now, window = now_ms(), tonumber(argv[9])
  if charged_recently(base, account, request_id, now, window) then return {'already', balance} end
  local before = checked(balance)
  checked(before - cost)
  local p = periods(now)
  local hold = redis.call('HGET', base .. ':holds:' .. account, request_id)
  if hold then
    -- The request happened: release the funds but keep its request-count slot. The funds go
    -- back to the key the hold was placed for (as void and expire do): an event naming another
    -- key must not lower that key's held. The spend is the event's key's, as its usage row
    -- says, so a reload from the ledger's counters finds it where this left it.
    local amount, hold_key_id = string.match(hold, '^(-?%d+)|(.*)|(-?%d+)|(-?%d+)$')
    redis.call('HINCRBY', account_key, 'held', 0 - tonumber(amount))
    redis.call('HINCRBY', base .. ':key:' .. hold_key_id, 'held', 0 - tonumber(amount))
    redis.call('HDEL', base .. ':holds:' .. account, request_id)
    redis.call('ZREM', base .. ':hold_expiry', account .. '\n' .. request_id)
  else
    -- Its hold expired (or went with an unload) and gave its request slot back: the request
    -- happened all the same, and counts, as the ledger's counters count it.
    count(base .. ':day:' .. account .. ':' .. p.day, 1, 2 * 86400000)
    count(base .. ':month:' .. account .. ':' .. p.month, 1, 32 * 86400000)
  end
  local after = redis.call('HINCRBY', account_key, 'balance', 0 - cost)
  local key_base = base .. ':key:' .. key_id
  redis.call('HINCRBY', key_base, 'spent_total', cost)
  local spent_day, spent_month = key_base .. ':spent_day:' .. p.day, key_base .. ':spent_month:' .. p.month
  count(spent_day, cost, 2 * 86400000)
  count(spent_month, cost, 32 * 86400000)
  local stored = argv[8]
  if stored == nil or stored == '' then stored = '1' end
  redis.call('SET', charged_key, stored, 'PX', QUEUED_CHARGE_TTL_MS)
  remember_charge(base, account, request_id, now, window)
  -- A free charge too: a reload must still know its id and count its request.
  redis.call('HSET', base .. ':unlogged:' .. account, request_id, argv[6])
  redis.call('XADD', base .. ':usage', '*', 'event', event, 'hot_balance_after', string.format('%d', after))
  if argv[10] and argv[10] ~= '' then
    redis.call('SET', base .. ':pin:' .. account .. ':' .. argv[10], pin_generation(base, account) .. '|' .. argv[11], 'PX', argv[12])
  end
  return {'settled', string.format('%d', before), string.format('%d', after)}
end

-- ARGV: op, base, account, request_id. Reply: the charged record of a charge the ledger may
-- not have yet (a binding with its stored response, or "1"), or nil.
function operations.stored(base, argv)
  return redis.call('GET', base .. ':charged:' .. argv[3] .. ':' .. argv[4])
end

-- ARGV: op, base, account. Reply: request_id, cost, ... of the account's charges whose usage
-- event the ledger may not have yet.
function operations.unlogged(base, argv)
  return redis.call('HGETALL', base .. ':unlogged:' .. argv[3])
end

-- ARGV: op, base, account, request_id, event_json. Reply: 1 if a hold was released, else 0.
function operations.void(base, argv)
  local account, request_id = argv[3], argv[4]
  local hold = redis.call('HGET', base .. ':holds:' .. account, request_id)
  if not hold then return 0 end
  release(base, account, request_id, hold, periods(now_ms()))
  redis.call('XADD', base .. ':usage', '*', 'event', argv[5], 'hot_balance_after', redis.call('HGET', base .. ':acct:' .. account, 'balance') or '0')
  return 1
end

-- ARGV: op, base, limit. Releases up to `limit` holds past their expiry. Reply: how many.
function operations.expire(base, argv)
  local now = now_ms()
  local p = periods(now)
  local due = redis.call('ZRANGEBYSCORE', base .. ':hold_expiry', '-inf', now, 'LIMIT', 0, tonumber(argv[3]))
  local released = 0
  for _, member in ipairs(due) do
    local account, request_id = string.match(member, '^(.-)\n(.*)$')
    local hold = redis.call('HGET', base .. ':holds:' .. account, request_id)
    if string.sub(request_id, 1, 1) == '\n' then
      release_withdrawal(base, account, string.sub(request_id, 2))
      released = released + 1
    elseif hold then
      release(base, account, request_id, hold, p)
      released = released + 1
    else
      redis.call('ZREM', base .. ':hold_expiry', member)
    end
  end
  return released
end

-- ARGV: op, base, account, balance, fund_seq, day, month, day requests, month requests, key count,
--       (key, spent day, spent month, spent total) per key. The account's charged ids went in
--       before, by `remember`.
-- Reply: 1 if loaded, 0 if the account was already there (two loaders cannot double a balance).
function operations.load(base, argv)
  local account = argv[3]
  local account_key = base .. ':acct:' .. account
  if redis.call('EXISTS', account_key) == 1 then return 0 end
  checked(argv[4])
  redis.call('HSET', account_key, 'balance', argv[4], 'held', 0, 'fund_seq', argv[5])
  -- The ledger's counters, each only for a period still current and never lowering a count.
  local p = periods(now_ms())
  local today, this_month = tonumber(argv[6]) == p.day, tonumber(argv[7]) == p.month
  local function raise(key, value, ttl_ms)
    if checked(value) > number_or_zero(redis.call('GET', key)) then
      redis.call('SET', key, value, 'PX', ttl_ms)
    end
  end
  if today then raise(base .. ':day:' .. account .. ':' .. p.day, argv[8], 2 * 86400000) end
  if this_month then raise(base .. ':month:' .. account .. ':' .. p.month, argv[9], 32 * 86400000) end
  local next = 11
  for _ = 1, tonumber(argv[10]) do
    local key_base = base .. ':key:' .. argv[next]
    if today then raise(key_base .. ':spent_day:' .. p.day, argv[next + 1], 2 * 86400000) end
    if this_month then raise(key_base .. ':spent_month:' .. p.month, argv[next + 2], 32 * 86400000) end
    if checked(argv[next + 3]) > number_or_zero(redis.call('HGET', key_base, 'spent_total')) then
      redis.call('HSET', key_base, 'spent_total', argv[next + 3])
    end
    next = next + 4
  end
  return 1
end

-- ARGV: op, base, account, recent_charge_ms, charged request ids... A loading account's ids
-- read from the ledger, in chunks, so that a busy account's window of ids is never one long
-- call; remembered from now on. Reply: how many.
function operations.remember(base, argv)
  local account, now, window = argv[3], now_ms(), tonumber(argv[4])
  for index = 5, #argv do
    remember_charge(base, account, argv[index], now, window)
  end
  return #argv - 4
end

-- ARGV: op, base, consumer group, recent_charge_ms, n, n stream entry ids, then (account,
-- request id) pairs.
-- Reply: 1. The worker's acknowledgement of events the ledger has committed, in one step: the
-- entries leave the shard's stream (an entry acknowledged but left there would be read by no
-- consumer again yet still look unlogged to whoever scans it); each charge's record goes (the
-- ledger has its binding and response now) and its id stays remembered — settle put it in its
-- bucket ("C…" records); a record an older version wrote ("1", "B…") had none, so its id goes
-- into the bucket of now — and the account no longer owes the charge to a reload.
function operations.acked(base, argv)
  local group, window, count = argv[3], tonumber(argv[4]), tonumber(argv[5])
  local stream = base .. ':usage'
  for first = 6, 5 + count, 1000 do
    local ids = {}
    for index = first, math.min(first + 999, 5 + count) do ids[#ids + 1] = argv[index] end
    redis.call('XACK', stream, group, unpack(ids))
    redis.call('XDEL', stream, unpack(ids))
  end
  local now = now_ms()
  for index = 6 + count, #argv, 2 do
    local account, request_id = argv[index], argv[index + 1]
    local record = base .. ':charged:' .. account .. ':' .. request_id
    local kind = redis.call('GETRANGE', record, 0, 0)
    if kind ~= '' then
      redis.call('DEL', record)
      if kind ~= 'C' then remember_charge(base, account, request_id, now, window) end
    end
    redis.call('HDEL', base .. ':unlogged:' .. account, request_id)
  end
  return 1
end

-- ARGV: op, base, account, fund_ledger_seq, amount, withdrawal id ("" if none).
-- Reply: {"applied", balance} | {"already"} | {"not_loaded"}. Applies a fund change once, in
-- order, and releases the withdrawal hold that reserved it in the same step, applied now or
-- before (the debit and its hold never both count).
function operations.apply_fund(base, argv)
  local account_key = base .. ':acct:' .. argv[3]
  local fund_seq = redis.call('HGET', account_key, 'fund_seq')
  if not fund_seq then return {'not_loaded'} end
  local withdrawal_id = argv[6] or ''
  if tonumber(argv[4]) <= tonumber(fund_seq) then
    if withdrawal_id ~= '' then release_withdrawal(base, argv[3], withdrawal_id) end
    return {'already'}
  end
  checked(argv[5])
  checked(checked(redis.call('HGET', account_key, 'balance')) + tonumber(argv[5]))
  if withdrawal_id ~= '' then release_withdrawal(base, argv[3], withdrawal_id) end
  local balance = redis.call('HINCRBY', account_key, 'balance', argv[5])
  redis.call('HSET', account_key, 'fund_seq', argv[4])
  return {'applied', string.format('%d', balance)}
end

-- ARGV: op, base, account, withdrawal id, amount, ttl_ms.
-- Reply: {"held"} | {"insufficient", free} | {"in_progress"} | {"not_loaded"}.
-- Keeps "funds out only from free funds": a refund or negative adjustment reserves at most
-- balance − held (never the credit limit), atomically with every hold and charge of the
-- account; the balance already lacks every settled charge the ledger may not have yet.
function operations.hold_withdrawal(base, argv)
  local account, withdrawal_id, amount, ttl_ms = argv[3], argv[4], checked(argv[5]), tonumber(argv[6])
  local account_key = base .. ':acct:' .. account
  local state = redis.call('HMGET', account_key, 'balance', 'held')
  if not state[1] then return {'not_loaded'} end
  local withdrawals_key = base .. ':withdrawals:' .. account
  if redis.call('HEXISTS', withdrawals_key, withdrawal_id) == 1 then return {'in_progress'} end
  local free = checked(state[1]) - checked(state[2] or 0)
  if free < amount then return {'insufficient', string.format('%d', free)} end
  redis.call('HINCRBY', account_key, 'held', amount)
  redis.call('HSET', withdrawals_key, withdrawal_id, string.format('%d', amount))
  redis.call('ZADD', base .. ':hold_expiry', now_ms() + ttl_ms, account .. '\n\n' .. withdrawal_id)
  return {'held'}
end

-- ARGV: op, base, account, withdrawal id. Releases a withdrawal the ledger did not write.
function operations.release_withdrawal(base, argv)
  release_withdrawal(base, argv[3], argv[4])
  return 1
end

-- ARGV: op, base, account, key. Reply: {} if not loaded, else
-- {balance, held, fund_seq, day requests, month requests, key spent day, month, total}.
function operations.balance(base, argv)
  local account, key_id = argv[3], argv[4]
  local state = redis.call('HMGET', base .. ':acct:' .. account, 'balance', 'held', 'fund_seq')
  if not state[1] then return {} end
  local p = periods(now_ms())
  local key_base = base .. ':key:' .. key_id
  return {
    state[1], state[2] or '0', state[3] or '0',
    redis.call('GET', base .. ':day:' .. account .. ':' .. p.day) or '0',
    redis.call('GET', base .. ':month:' .. account .. ':' .. p.month) or '0',
    redis.call('GET', key_base .. ':spent_day:' .. p.day) or '0',
    redis.call('GET', key_base .. ':spent_month:' .. p.month) or '0',
    redis.call('HGET', key_base, 'spent_total') or '0',
  }
end

-- ARGV: op, base, account. Forgets the account (after a repair, when quiet).
-- Its holds go with it, and so does what they kept of their keys' held: the key hashes outlive
-- the account, and a hold left counted there would refuse the key's budgets early for good
-- (their expiry entries go too, rather than wait for a sweep to find them empty). The unload
-- is not refused while holds are open: its caller (the resync after ledger charging) unloads
-- because this state misses the ledger's charges, and must not go on serving it. Each hold is
-- released as an expiry releases it, request-count slot included (the in-process store drops
-- its counters with the account); a request whose hold goes here still settles, in the ledger,
-- whose counters then count it.
function operations.unload(base, argv)
  local account = argv[3]
  local holds_key = base .. ':holds:' .. account
  local holds = redis.call('HGETALL', holds_key)
  local now_periods = periods(now_ms())
  for index = 1, #holds, 2 do
    release(base, account, holds[index], holds[index + 1], now_periods)
  end
  redis.call('DEL', base .. ':acct:' .. account, holds_key, base .. ':withdrawals:' .. account)
  return 1
end

-- Session locks (issue 23): <base>:lock:<account>:<session> = the holder's token, with its TTL;
-- <base>:lockfence:<account> counts the locks granted, each one's fencing number.
-- ARGV: op, base, account, session, token, ttl_ms. Reply: the fencing number, or 0 while held.
function operations.lock_session(base, argv)
  if not redis.call('SET', base .. ':lock:' .. argv[3] .. ':' .. argv[4], argv[5], 'NX', 'PX', argv[6]) then return 0 end
  return redis.call('INCR', base .. ':lockfence:' .. argv[3])
end

-- ARGV: op, base, account, session, token, ttl_ms. Reply: 1 if renewed, 0 if not the holder.
function operations.renew_session_lock(base, argv)
  local key = base .. ':lock:' .. argv[3] .. ':' .. argv[4]
  if redis.call('GET', key) ~= argv[5] then return 0 end
  redis.call('PEXPIRE', key, argv[6])
  return 1
end

-- ARGV: op, base, account, session, token ("" for whoever holds it). Reply: 1 if released.
-- Compare-and-delete: a holder whose lock expired and went to another never releases that one.
function operations.unlock_session(base, argv)
  local key = base .. ':lock:' .. argv[3] .. ':' .. argv[4]
  if argv[5] ~= '' and redis.call('GET', key) ~= argv[5] then return 0 end
  return redis.call('DEL', key)
end

-- ARGV: op, base, account. Forgets every routing pin of the account. Reply: the new generation.
function operations.clear_pins(base, argv)
  return redis.call('INCR', base .. ':pingen:' .. argv[3])
end

-- ARGV: op, base, account, seen balance, seen fund_seq, new balance. Reply: 1 if repaired, else 0.
-- Sets the balance only if nothing moved since reconciliation read it and nothing is held.
function operations.repair(base, argv)
  local account_key = base .. ':acct:' .. argv[3]
  local state = redis.call('HMGET', account_key, 'balance', 'held', 'fund_seq')
  if not state[1] then return 0 end
  if state[1] ~= argv[4] or (state[3] or '0') ~= argv[5] or tonumber(state[2] or '0') ~= 0 then return 0 end
  checked(argv[6])
  redis.call('HSET', account_key, 'balance', argv[6])
  return 1
end

local operation = operations[ARGV[1]]
if not operation then
  local name, at_ms = string.match(tostring(ARGV[1]), '^([%a_]+)@(%d+)$')
  if name then
    operation = operations[name]
    fixed_now_ms = tonumber(at_ms)
  end
end
if not operation then return error('unknown operation ' .. tostring(ARGV[1])) end
return operation(ARGV[2], ARGV)
