-- lib.lua: functions shared by admit.lua, settle.lua, cancel.lua and sweep.lua. EVAL scripts cannot
-- import, so limits.py prepends this file to each of them when it registers the script.

-- A reservation record: "tokens images usd_micros\nDAY_KEY\nMONTH_KEY[\nUNSETTLED_RECORD]", the last
-- line (optional) a JSON array [field, value, ...] of the ledger record to write if the lease expires.
local function parse_reservation(rec)
  return string.match(rec, '^(%d+) (%d+) (%d+)\n([^\n]*)\n([^\n]*)\n?(.*)$')
end

-- Take amounts (tokens, images, usd micros) off the reserved counters of period hash `k`.
local function unreserve(k, t, i, u)
  -- 0 - x, not -x: -0 would reach Redis as "-0", which HINCRBY refuses.
  redis.call('HINCRBY', k, 'res_tokens', 0 - tonumber(t))
  redis.call('HINCRBY', k, 'res_images', 0 - tonumber(i))
  redis.call('HINCRBY', k, 'res_usd_micros', 0 - tonumber(u))
end

-- Give back the reservation of request `rid` (from the reservations HASH `res_key`) in the
-- period hashes `day_key` and `month_key`, where they are the periods it was made in (a
-- reservation of a closed period is only dropped: no check reads that period again).
-- Returns true if there was a reservation.
local function release_reservation(res_key, rid, day_key, month_key)
  local rec = redis.call('HGET', res_key, rid)
  if not rec then return false end
  redis.call('HDEL', res_key, rid)
  local t, i, u, dkey, mkey = parse_reservation(rec)
  for _, k in ipairs({day_key, month_key}) do
    if k == dkey or k == mkey then unreserve(k, t, i, u) end
  end
  return true
end

-- A lease past its deadline without a settle: its worker died (or overran the lease). The upstream
-- may have generated and billed the request, so its reservation becomes its usage (the quota keeps
-- the estimate: reserved -> used, one more request) in the periods it was made in, its unsettled
-- record goes to the ledger, and the settled marker makes a late settle of it a no-op (no double
-- count). The period keys come from the reservation record: they share the user's hash tag with
-- the KEYS, so the script still touches one Cluster slot. Returns 1 if a record was written.
local function expire_lease(inflight_key, res_key, ledger_key, rid, marker_key, marker_ttl, maxlen)
  redis.call('ZREM', inflight_key, rid)
  local rec = redis.call('HGET', res_key, rid)
  if not rec then return 0 end
  redis.call('HDEL', res_key, rid)
  local t, i, u, dkey, mkey, record = parse_reservation(rec)
  -- Already settled or cancelled (a duplicate admission of the same id): only give the reservation back.
  local counted = redis.call('SET', marker_key, '1', 'NX', 'EX', marker_ttl)
  for _, k in ipairs({dkey, mkey}) do
    if redis.call('EXISTS', k) == 1 then  -- a period key gone by its TTL is not brought back
      unreserve(k, t, i, u)
      if counted then
        redis.call('HINCRBY', k, 'requests', 1)
        redis.call('HINCRBY', k, 'total_tokens', t)
        redis.call('HINCRBY', k, 'images', i)
        redis.call('HINCRBY', k, 'usd_micros', u)
      end
    end
  end
  if not counted then return 0 end
  if record ~= nil and record ~= '' then
    redis.call('XADD', ledger_key, 'MAXLEN', '~', maxlen, '*', unpack(cjson.decode(record)))
  end
  return 1
end
