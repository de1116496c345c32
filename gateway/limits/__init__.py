"""Per-user rate limits and quotas in Redis (Lua scripts in lua/)."""
