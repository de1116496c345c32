"""Everything a Redis holds, as one string to search (for "no secret is stored anywhere" checks)."""

from __future__ import annotations

from typing import Any

import redis


def redis_contents(client: redis.Redis) -> str:
    """Every key with its value, every type included (streams hold the ledger)."""
    read: dict[str, Any] = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
                            "list": lambda k: client.lrange(k, 0, -1), "zset": lambda k: client.zrange(k, 0, -1),
                            "stream": client.xrange}
    parts = []
    for key in client.scan_iter(match="*", count=1000):
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        parts.append(f"{key!r}={read[kind](key) if kind in read else kind!r}")
    return "\n".join(parts)
