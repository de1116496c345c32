-- settle.lua: finish one admitted request: free its slot and reservation, add its usage.
-- KEYS[1]  in-flight leases ZSET (see admit.lua)
-- KEYS[2]  reservations     HASH (see admit.lua)
-- KEYS[3]  usage of the UTC day of the admission    HASH
-- KEYS[4]  usage of the UTC month of the admission  HASH
--          fields: requests images input_tokens input_text_tokens input_image_tokens
--          output_tokens total_tokens usd_micros, and res_tokens res_images res_usd_micros
-- KEYS[5]  settled marker   STRING (makes a retried settle a no-op; also set when the lease
--          expired unsettled, so a late settle after that record counts nothing twice)
-- KEYS[6]  ledger           STREAM
-- ARGV[1]  request_id
-- ARGV[2..7] usage: input_text_tokens input_image_tokens output_tokens total_tokens images
--          usd_micros (all 0 for a failed call)
-- ARGV[8]  day key TTL s   ARGV[9] month key TTL s   ARGV[10] marker TTL s
-- ARGV[11] ledger MAXLEN (trimmed approximately)
-- ARGV[12] ledger record: the JSON array [field, value, ...] of strings ('': no record appended);
--          one argument rather than ~46, which the gateway would pack and Redis parse one by one
-- returns  1 settled now, 0 already settled (nothing changed but the request's lease, freed)
-- errors   "ERR settle: bad ARGV[i]" (or "... would overflow ...") when an argument is not
--          an integer in range: raised before the first write, so nothing changed and a retry
--          with good arguments still settles. Redis does not roll a script back, so every check
--          runs before any write: all or nothing.

-- Below 2^53 every count is exact in Lua's doubles, and sums stay far from HINCRBY's 2^63.
local MAX = 9007199254740991
local function count(i, min)
  local v = ARGV[i]
  if not string.match(v, '^%d+$') or #v > 16 or tonumber(v) > MAX or tonumber(v) < min then
    return redis.error_reply('ERR settle: bad ARGV[' .. i .. ']')
  end
end
for i = 2, 7 do
  local bad = count(i, 0)
  if bad then return bad end
end
for i = 8, 11 do
  local bad = count(i, 1)
  if bad then return bad end
end
if #ARGV ~= 12 then return redis.error_reply('ERR settle: expected 12 arguments') end
local record = nil
if ARGV[12] ~= '' then
  local ok, decoded = pcall(cjson.decode, ARGV[12])
  if not ok or type(decoded) ~= 'table' or #decoded % 2 ~= 0 then
    return redis.error_reply('ERR settle: bad ledger record (ARGV[12]): not a JSON array of field, value pairs')
  end
  for j = 1, #decoded do
    if type(decoded[j]) ~= 'string' then
      return redis.error_reply('ERR settle: bad ledger record (ARGV[12]): item ' .. j .. ' is not a string')
    end
  end
  if #decoded > 0 then record = decoded end
end
if tonumber(ARGV[2]) + tonumber(ARGV[3]) > MAX then
  return redis.error_reply('ERR settle: bad ARGV[2]')
end
local fields = {'input_text_tokens', 'input_image_tokens', 'output_tokens', 'total_tokens', 'images',
                'usd_micros'}
for _, k in ipairs({KEYS[3], KEYS[4]}) do
  local now = redis.call('HMGET', k, unpack(fields))
  for j = 1, 6 do
    if (tonumber(now[j]) or 0) + tonumber(ARGV[j + 1]) > MAX then
      return redis.error_reply('ERR settle: ' .. fields[j] .. ' would overflow ' .. k)
    end
  end
end

-- The slot is freed even by a repeat: a job re-run after its first run settled (its result could
-- not be stored) holds a lease again under the same request id, which only this call frees.
local rid = ARGV[1]
redis.call('ZREM', KEYS[1], rid)
if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', ARGV[10]) then return 0 end

-- Give the reservation back. Only the period keys it was made in are released, as admit does.
release_reservation(KEYS[2], rid, KEYS[3], KEYS[4])

-- Every finished admitted request counts in `requests`, whatever its status.
for j, k in ipairs({KEYS[3], KEYS[4]}) do
  redis.call('HINCRBY', k, 'requests', 1)
  redis.call('HINCRBY', k, 'input_text_tokens', ARGV[2])
  redis.call('HINCRBY', k, 'input_image_tokens', ARGV[3])
  redis.call('HINCRBY', k, 'input_tokens', tonumber(ARGV[2]) + tonumber(ARGV[3]))
  redis.call('HINCRBY', k, 'output_tokens', ARGV[4])
  redis.call('HINCRBY', k, 'total_tokens', ARGV[5])
  redis.call('HINCRBY', k, 'images', ARGV[6])
  redis.call('HINCRBY', k, 'usd_micros', ARGV[7])
  redis.call('EXPIRE', k, ARGV[7 + j])
end

if record then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[11], '*', unpack(record))
end
return 1
