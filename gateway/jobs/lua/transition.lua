-- transition.lua: move a job from one status to another, only if it is in the expected one.
-- KEYS[1]  the job          HASH (fields: see gateway/jobs/model.py)
-- ARGV[1]  expected status (several separated by '|')
-- ARGV[2]  job TTL s (the hash is kept this long after each change)
-- ARGV[3..] field, value, ... to set (the new status among them)
-- returns  1 if the job was in an expected status and is now changed, 0 otherwise (nothing written)
--
-- Cancellation and a runner starting the same job race; whichever runs first wins, the other
-- sees the status it did not expect and leaves the job alone.

local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local ok = false
for expected in string.gmatch(ARGV[1], '[^|]+') do
  if expected == status then ok = true end
end
if not ok then return 0 end
local fields = {}
for j = 3, #ARGV do fields[#fields + 1] = ARGV[j] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
