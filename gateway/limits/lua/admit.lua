-- admit.lua: admit one request against a user's per-minute windows, concurrency and quotas.
-- KEYS[1]  requests window  ZSET  member request_id,           score admission ms
-- KEYS[2]  images window    ZSET  members request_id:1..n,     score admission ms
-- KEYS[3]  in-flight leases ZSET  member request_id,           score lease deadline ms
-- KEYS[4]  reservations     HASH  request_id -> "tokens images usd_micros\nDAY_KEY\nMONTH_KEY[\nRECORD]"
--          (RECORD: the JSON [field, value, ...] ledger record written if the lease expires)
-- KEYS[5]  usage of the current UTC day    HASH (fields: see settle.lua, plus res_*)
-- KEYS[6]  usage of the current UTC month  HASH
-- KEYS[7]  ledger           STREAM (records of expired leases, see lib.lua expire_lease)
-- ARGV[1]  request_id            ARGV[2] now ms           ARGV[3] lease deadline ms
-- ARGV[4]  n (images)            ARGV[5] estimated tokens ARGV[6] estimated usd micros
-- ARGV[7..14] limits, -1 = unlimited: requests_per_minute, images_per_minute,
--          max_concurrent_requests, tokens_per_day, tokens_per_month, images_per_day,
--          images_per_month, usd_micros_per_month
-- ARGV[15] day key TTL s         ARGV[16] month key TTL s ARGV[17] window ms (60000)
-- ARGV[18] mode: 'all' (a request: every check and write), 'reserve' (a job's submission:
--          quota checks and the reservation only), 'pace' (a job starting: per-minute and
--          concurrency checks, window entries and lease only; its reservation was made at
--          submission under the same request_id)
-- ARGV[19] this request's unsettled ledger record, JSON ('' for none)
-- ARGV[20] settled marker key prefix (the marker of request R is ARGV[20] .. R)
-- ARGV[21] settled marker TTL s  ARGV[22] ledger MAXLEN (trimmed approximately)
-- returns  admitted: {1, requests_in_window, oldest_request_ms, images_in_window,
--                     oldest_image_ms, day_tokens_committed, month_tokens_committed}
--          (status 2 instead of 1: this request_id was already admitted in this mode, nothing written)
--          refused:  {0, limit_name, retry_after_ms}
--
-- Every check runs before any write, so a refused request leaves no trace. The only
-- writes before the checks drop state that no longer counts (old window entries,
-- expired leases), which changes no answer.

local rid, now, deadline = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n, est_tokens, est_usd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local window = tonumber(ARGV[17])
local mode = ARGV[18] or 'all'
local paced, reserved = mode ~= 'reserve', mode ~= 'pace'  -- what this mode checks and writes

local function limit(i)
  local v = tonumber(ARGV[i])
  if v < 0 then return nil end
  return v
end
local rpm, ipm, conc = limit(7), limit(8), limit(9)
local tpd, tpm, ipd, ipmo, usdm = limit(10), limit(11), limit(12), limit(13), limit(14)

local function num(v) return tonumber(v) or 0 end  -- HMGET answers false for a missing field

-- Only ever lengthen a TTL: a replica with a slower clock must not shorten it.
local function keep_for(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

-- An entry admitted at s counts while now - s < window: one admitted at 0 is free at 60000.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)

-- Leases past their deadline belong to workers that died (or overran the lease) without
-- settling: free their slot and give back their reservation. A reservation of a closed
-- period is only dropped: no check reads that period again, and its key is not in KEYS.
-- Bounded per call; leftovers are skipped by the ZCOUNT below and reclaimed next time.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 256)
for _, id in ipairs(expired) do
  expire_lease(KEYS[3], KEYS[4], KEYS[7], id, ARGV[20] .. id, ARGV[21], ARGV[22])
end

local function oldest(key)
  local e = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #e == 0 then return now end
  return tonumber(e[2])
end

local function tokens_committed(key)
  local v = redis.call('HMGET', key, 'total_tokens', 'res_tokens')
  return num(v[1]) + num(v[2])
end

local function admitted(status)
  return {status, redis.call('ZCARD', KEYS[1]), oldest(KEYS[1]), redis.call('ZCARD', KEYS[2]),
          oldest(KEYS[2]), tokens_committed(KEYS[5]), tokens_committed(KEYS[6])}
end

-- A retried admit (the reply of the first was lost) must neither count twice nor refuse.
if paced and redis.call('ZSCORE', KEYS[3], rid) then return admitted(2) end
if not paced and redis.call('HEXISTS', KEYS[4], rid) == 1 then return admitted(2) end

-- Time until the k-th oldest entry of a window leaves it (the whole window if there is
-- no such entry: the request can never fit, e.g. n > images_per_minute).
local function wait_for(key, k)
  if k < 1 then return window end
  local e = redis.call('ZRANGE', key, k - 1, k - 1, 'WITHSCORES')
  if #e == 0 then return window end
  return tonumber(e[2]) + window - now
end

-- Checks, in the documented order.
if not paced then conc, rpm, ipm = nil, nil, nil end
if not reserved then tpd, tpm, ipd, ipmo, usdm = nil, nil, nil, nil, nil end
if conc and redis.call('ZCOUNT', KEYS[3], '(' .. ARGV[2], '+inf') >= conc then
  -- When a slot frees is unknown (leases are upper bounds): suggest a short retry.
  return {0, 'max_concurrent_requests', 1000}
end
local reqs = redis.call('ZCARD', KEYS[1])
if rpm and reqs + 1 > rpm then
  return {0, 'requests_per_minute', wait_for(KEYS[1], reqs + 1 - rpm)}
end
local imgs = redis.call('ZCARD', KEYS[2])
if ipm and imgs + n > ipm then
  local k = imgs + n - ipm
  if n > ipm then k = 0 end
  return {0, 'images_per_minute', wait_for(KEYS[2], k)}
end
if tpd or tpm or ipd or ipmo or usdm then
  -- Admit only if used + reserved + this estimate fits.
  local d = redis.call('HMGET', KEYS[5], 'total_tokens', 'res_tokens', 'images', 'res_images')
  local m = redis.call('HMGET', KEYS[6], 'total_tokens', 'res_tokens', 'images', 'res_images',
                       'usd_micros', 'res_usd_micros')
  if tpd and num(d[1]) + num(d[2]) + est_tokens > tpd then return {0, 'tokens_per_day', 0} end
  if tpm and num(m[1]) + num(m[2]) + est_tokens > tpm then return {0, 'tokens_per_month', 0} end
  if ipd and num(d[3]) + num(d[4]) + n > ipd then return {0, 'images_per_day', 0} end
  if ipmo and num(m[3]) + num(m[4]) + n > ipmo then return {0, 'images_per_month', 0} end
  if usdm and num(m[5]) + num(m[6]) + est_usd > usdm then return {0, 'usd_per_month', 0} end
end

-- Writes. Windows, lease and reservation are kept for every request, limited or not, so a
-- user's limits count all of the user's requests whichever key (and key limits) they used.
-- Leases and reservations live as long as the month aggregate they reserve in: if they
-- expired with the lease, an unsettled reservation could never be given back and the
-- res_* counters would stay inflated for the rest of the period. Entries leave on settle
-- or reclaim, so the keys stay small.
local keep_ms = tonumber(ARGV[16]) * 1000
if paced then
  redis.call('ZADD', KEYS[1], now, rid)
  keep_for(KEYS[1], window)
  if n > 0 then
    local members = {}
    for i = 1, n do
      members[#members + 1] = now
      members[#members + 1] = rid .. ':' .. i
    end
    redis.call('ZADD', KEYS[2], unpack(members))
    keep_for(KEYS[2], window)
  end
  redis.call('ZADD', KEYS[3], deadline, rid)
  keep_for(KEYS[3], keep_ms)
end
if not reserved then return admitted(1) end
-- The amounts are stored as the caller's strings: Lua's tostring would round big numbers.
local reservation = ARGV[5] .. ' ' .. ARGV[4] .. ' ' .. ARGV[6] .. '\n' .. KEYS[5] .. '\n' .. KEYS[6]
if ARGV[19] ~= '' then reservation = reservation .. '\n' .. ARGV[19] end
redis.call('HSET', KEYS[4], rid, reservation)
keep_for(KEYS[4], keep_ms)
for j, k in ipairs({KEYS[5], KEYS[6]}) do
  redis.call('HINCRBY', k, 'res_tokens', est_tokens)
  redis.call('HINCRBY', k, 'res_images', n)
  redis.call('HINCRBY', k, 'res_usd_micros', est_usd)
  redis.call('EXPIRE', k, ARGV[14 + j])
end
return admitted(1)
