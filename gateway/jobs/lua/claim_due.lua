-- claim_due.lua: claim webhook deliveries that are due, so one worker sends each attempt.
-- KEYS[1]  deliveries  ZSET  "user/job_id" -> when the next attempt is due (ms)
-- ARGV[1]  now ms   ARGV[2] lease ms   ARGV[3] at most this many
-- returns  the claimed members; each is now due again at now + lease, so a worker that dies
--          mid-attempt leaves it to another one after the lease
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), member)
end
return due
