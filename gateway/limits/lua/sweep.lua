-- sweep.lua: expire one user's leases that passed their deadline without a settle (their worker
-- died), as admit.lua does, for users who send nothing more. Run per user by each worker's
-- background sweep (metering/sweeper.py): one user, one hash tag, one Cluster slot per call.
-- KEYS[1]  in-flight leases ZSET (see admit.lua)
-- KEYS[2]  reservations     HASH (see admit.lua; the period keys named in its records are touched too)
-- KEYS[3]  ledger           STREAM
-- ARGV[1]  now ms   ARGV[2] settled marker key prefix   ARGV[3] marker TTL s
-- ARGV[4]  ledger MAXLEN   ARGV[5] most leases expired in this call
-- returns  the number of unsettled records written

local written = 0
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(expired) do
  written = written + expire_lease(KEYS[1], KEYS[2], KEYS[3], id, ARGV[2] .. id, ARGV[3], ARGV[4])
end
return written
