-- auth_fail.lua: count one failed authentication from a client address; block it past the limit.
-- KEYS[1]  failures  ZSET    member failure id, score failure ms; only the last ARGV[3] kept
-- KEYS[2]  block     STRING  present while the address's failures are refused; TTL = time left
-- ARGV[1]  now ms           ARGV[2] failure id (unique)    ARGV[3] failures allowed per window
-- ARGV[4]  window ms (60000)                               ARGV[5] block ms
-- returns  {0, failures_kept}   counted, not blocked
--          {1, block_ms_left}   counted, and the address is blocked: refuse this failure (429)
--          {2, block_ms}        counted, this failure reached the limit: blocked from now on
--
-- The rule: an address is blocked for ARGV[5] ms from any failure that makes ARGV[3]
-- failures within ARGV[4] ms. Failures are counted while blocked too, so an address that
-- keeps failing faster than the limit stays blocked until ARGV[5] ms after it slows down,
-- and the count never restarts from zero at the end of a block. Keeping only the last
-- ARGV[3] failures bounds the set whatever the flood: "ARGV[3] failures within the window"
-- is "the oldest of the last ARGV[3] is within the window".
-- Both keys carry the address's hash tag, so the script touches one Cluster slot.

local now, id = tonumber(ARGV[1]), ARGV[2]
local allowed, window, block = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

redis.call('ZADD', KEYS[1], now, id)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(allowed + 1))
redis.call('PEXPIRE', KEYS[1], window)
local kept = redis.call('ZCARD', KEYS[1])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local left = redis.call('PTTL', KEYS[2])
if kept >= allowed and tonumber(oldest[2]) > now - window then
  redis.call('SET', KEYS[2], '1', 'PX', block)
  if left > 0 then return {1, block} end
  return {2, block}
end
if left > 0 then return {1, left} end
return {0, kept}
