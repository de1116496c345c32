-- cancel.lua: undo an admission whose answer never reached the gateway (a Redis timeout after
-- admit.lua ran): the client was told 503, so the request must not hold the user's slot,
-- window entries or reservation. A no-op when admit never ran or the request was settled.
-- KEYS[1]  requests window  ZSET (see admit.lua)
-- KEYS[2]  images window    ZSET
-- KEYS[3]  in-flight leases ZSET
-- KEYS[4]  reservations     HASH
-- KEYS[5]  usage of the UTC day of the admission    HASH
-- KEYS[6]  usage of the UTC month of the admission  HASH
-- KEYS[7]  settled marker   STRING (set here too: a late settle of this id changes nothing)
-- ARGV[1]  request_id   ARGV[2] n (images)   ARGV[3] marker TTL s
-- returns  1 if something was undone, 0 otherwise

if not redis.call('SET', KEYS[7], '1', 'NX', 'EX', ARGV[3]) then return 0 end
local rid = ARGV[1]
local undone = redis.call('ZREM', KEYS[1], rid) + redis.call('ZREM', KEYS[3], rid)
for i = 1, tonumber(ARGV[2]) do
  undone = undone + redis.call('ZREM', KEYS[2], rid .. ':' .. i)
end
if release_reservation(KEYS[4], rid, KEYS[5], KEYS[6]) then undone = undone + 1 end
if undone > 0 then return 1 end
return 0
