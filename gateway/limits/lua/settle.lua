-- settle.lua: finish one admitted request: free its slot and reservation, add its usage.
-- KEYS[1]  in-flight leases ZSET (see admit.lua)
-- KEYS[2]  reservations     HASH (see admit.lua)
-- KEYS[3]  usage of the UTC day of the admission    HASH
-- KEYS[4]  usage of the UTC month of the admission  HASH
--          fields: requests images input_tokens input_text_tokens input_image_tokens
--          output_tokens total_tokens usd_micros, and res_tokens res_images res_usd_micros
-- KEYS[5]  settled marker   STRING (makes a retried settle a no-op)
-- KEYS[6]  ledger           STREAM
-- ARGV[1]  request_id
-- ARGV[2..7] usage: input_text_tokens input_image_tokens output_tokens total_tokens images
--          usd_micros (all 0 for a failed call)
-- ARGV[8]  day key TTL s   ARGV[9] month key TTL s   ARGV[10] marker TTL s
-- ARGV[11] ledger MAXLEN (trimmed approximately)
-- ARGV[12..] ledger record as field, value, ... (none: no record appended)
-- returns  1 settled now, 0 already settled (nothing changed)

if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', ARGV[10]) then return 0 end

local rid = ARGV[1]
redis.call('ZREM', KEYS[1], rid)

-- Give the reservation back unless admit already reclaimed it (the lease expired).
-- Only the period keys it was made in are released, as admit does.
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

if #ARGV > 11 then
  local record = {}
  for j = 12, #ARGV do record[#record + 1] = ARGV[j] end
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[11], '*', unpack(record))
end
return 1
