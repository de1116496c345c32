-- release.lua: give back a claim whose request the gateway refused itself (nothing was billed),
-- so the key can be used again.
-- KEYS[1]  the key's record  HASH (see claim.lua)
-- ARGV[1]  claim token
-- returns  1 released, 0 not ours (taken over after our lease, or already done)

if redis.call('HGET', KEYS[1], 'state') == 'running' and redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
