-- auth_fail.lua: count one failed authentication from a client address; block it past the limit.
-- KEYS[1]  failures  ZSET    member failure id, score failure ms (only the last window kept)
-- KEYS[2]  block     STRING  present while the address is refused; its TTL is the time left
-- ARGV[1]  now ms           ARGV[2] failure id (unique)    ARGV[3] failures allowed per window
-- ARGV[4]  window ms (60000)                               ARGV[5] block ms
-- returns  {0, failures_in_window}  counted, not blocked
--          {1, block_ms_left}       already blocked: nothing counted
--          {2, block_ms}            this failure reached the limit: the address is now blocked
--
-- Both keys carry the address's hash tag, so the script touches one Cluster slot.

local now, id = tonumber(ARGV[1]), ARGV[2]
local allowed, window, block = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {1, left} end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, id)
redis.call('PEXPIRE', KEYS[1], window)
local failures = redis.call('ZCARD', KEYS[1])
if failures >= allowed then
  redis.call('SET', KEYS[2], '1', 'PX', block)
  redis.call('DEL', KEYS[1])  -- the count starts again when the block ends
  return {2, block}
end
return {0, failures}
