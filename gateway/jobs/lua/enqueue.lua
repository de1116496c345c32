-- enqueue.lua: store a new job and queue it, in one step (a job is never half there).
-- KEYS[1]  the job            HASH (fields: see gateway/jobs/model.py)
-- KEYS[2]  the user's jobs    ZSET  job_id -> creation ms (listings)
-- KEYS[3]  the user's queue   STREAM (entries {job = job_id}; consumer group 'runners')
-- ARGV[1]  job_id   ARGV[2] creation ms   ARGV[3] TTL s (job hash and listing)
-- ARGV[4..] the job's fields as field, value, ...
-- returns  the stream entry id; an existing job id is left alone (returns false)
--
-- The consumer group is created here (from the stream's start) so that no entry is ever
-- added before a group exists to deliver it.

if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fields = {}
for j = 4, #ARGV do fields[#fields + 1] = ARGV[j] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]) * 1000)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.pcall('XGROUP', 'CREATE', KEYS[3], 'runners', '0', 'MKSTREAM')  -- BUSYGROUP: it exists
return redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
