-- lib.lua: functions shared by admit.lua, settle.lua and cancel.lua. EVAL scripts cannot
-- import, so limits.py prepends this file to each of them when it registers the script.

-- Give back the reservation of request `rid` (from the reservations HASH `res_key`) in the
-- period hashes `day_key` and `month_key`, where they are the periods it was made in (a
-- reservation of a closed period is only dropped: no check reads that period again).
-- Returns true if there was a reservation.
local function release_reservation(res_key, rid, day_key, month_key)
  local rec = redis.call('HGET', res_key, rid)
  if not rec then return false end
  redis.call('HDEL', res_key, rid)
  local t, i, u, dkey, mkey = string.match(rec, '^(%d+) (%d+) (%d+)\n([^\n]*)\n(.*)$')
  for _, k in ipairs({day_key, month_key}) do
    if k == dkey or k == mkey then
      -- 0 - x, not -x: -0 would reach Redis as "-0", which HINCRBY refuses.
      redis.call('HINCRBY', k, 'res_tokens', 0 - tonumber(t))
      redis.call('HINCRBY', k, 'res_images', 0 - tonumber(i))
      redis.call('HINCRBY', k, 'res_usd_micros', 0 - tonumber(u))
    end
  end
  return true
end

