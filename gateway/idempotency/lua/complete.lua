-- complete.lua: store the answer of a claimed Idempotency-Key; later claims replay it.
-- KEYS[1]  the key's record  HASH (see claim.lua)
-- ARGV[1]  fingerprint   ARGV[2] status   ARGV[3] headers (JSON object)
-- ARGV[4]  body (empty when the body is kept elsewhere)   ARGV[5] blob reference ('' : none)
-- ARGV[6]  record TTL ms (the answer is kept this long from now)
-- returns  1 stored, 0 not stored (an answer was already stored, or the key now holds another request)
--
-- Stored whoever holds the claim now: a runner whose lease expired still has a real answer, and
-- the first answer stored is the one every repeat gets. The record is recreated if it expired.

local fp = redis.call('HGET', KEYS[1], 'fp')
if fp and fp ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') == 'done' then return 0 end
redis.call('HDEL', KEYS[1], 'token', 'lease')
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'done', 'status', ARGV[2], 'headers', ARGV[3],
           'body', ARGV[4], 'blob', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
