-- claim.lua: claim one Idempotency-Key of a user, or learn what became of it, in one round trip.
-- KEYS[1]  the key's record  HASH  fp (route + request fingerprint), state (running | done),
--          token and lease (ms deadline) while running; status, headers, body or blob once done
-- ARGV[1]  fingerprint   ARGV[2] claim token (the request id)   ARGV[3] now ms
-- ARGV[4]  lease deadline ms (a claim not completed by then is taken over)
-- ARGV[5]  record TTL ms (idempotency.ttl_seconds, from the first use)
-- returns  {'claimed'}                       no record, or the holder's lease expired: run it
--          {'mismatch'}                      the key was first used with another request
--          {'running', lease_deadline_ms}    another request holds it: wait and ask again
--          {'done', status, headers, body, blob}  the stored answer (body empty when blob is set)
--
-- A record is only ever claimed by one caller at a time: the check and the write are one script.

local fp, token, now, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local rec = redis.call('HMGET', KEYS[1], 'fp', 'state', 'lease')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'fp', fp, 'state', 'running', 'token', token, 'lease', deadline)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'claimed'}
end
if rec[1] ~= fp then return {'mismatch'} end
if rec[2] == 'done' then
  local answer = redis.call('HMGET', KEYS[1], 'status', 'headers', 'body', 'blob')
  return {'done', answer[1], answer[2], answer[3] or '', answer[4] or ''}
end
if tonumber(rec[3]) > now then return {'running', rec[3]} end
-- The holder died (or hung) past its lease: this caller runs the request again.
redis.call('HSET', KEYS[1], 'token', token, 'lease', deadline)
return {'claimed'}
