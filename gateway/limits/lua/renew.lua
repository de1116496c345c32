-- renew.lua: push back the lease deadline of a request that is still running (a long stream), so
-- its slot and reservation are not reclaimed as a dead worker's while it runs.
-- KEYS[1]  in-flight leases ZSET (see admit.lua)
-- ARGV[1]  request_id   ARGV[2] new lease deadline ms
-- returns  1 if the lease was pushed back, 0 if it is gone (settled, cancelled or reclaimed) or
--          already ends later; a lease that is gone is never created again

return redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', ARGV[2], ARGV[1])
