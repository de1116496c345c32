-- prune_consumers.lua: drop a job stream's consumers that hold no entry and were idle a while.
-- KEYS[1]  the user's job stream   STREAM (group ARGV[1]; see gateway/jobs/queue.py)
-- ARGV[1]  the consumer group
-- ARGV[2]  min idle ms: consumers idle for less are kept
-- returns  the number of consumers deleted (0 when the stream or its group does not exist)
--
-- Every runner process reads under a consumer name of its own (host-pid-random), so each restart
-- would leave a name behind in every stream it read. A consumer with no pending entry holds
-- nothing: deleting it loses nothing, and a live runner's name comes back on its next read.
-- One script, so no runner can read an entry between the check and the delete (XGROUP
-- DELCONSUMER drops the consumer's pending entries with it).

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local min_idle = tonumber(ARGV[2])
local deleted = 0
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    deleted = deleted + 1
  end
end
return deleted
