"""The Redis client: standalone or Cluster, every call bounded by a timeout."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry  # the asyncio one: redis.retry.Retry would not await (no retry)
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import RedisSettings

# Everything that means "Redis did not answer": RedisClusterException is not a RedisError in redis-py.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


def open_redis(settings: RedisSettings) -> Any:
    """A client whose calls fail fast (``redis.timeout_seconds``) instead of hanging requests."""
    common: dict[str, Any] = {
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.timeout_seconds,
        "decode_responses": False,
    }
    if settings.cluster:
        return RedisCluster.from_url(settings.url, max_connections=settings.max_connections, **common)
    # A burst of admissions larger than the pool waits for a free connection (redis.pool_wait_seconds)
    # instead of failing with "Too many connections" as the default pool does.
    # One quick retry for a connection dropped by a Redis restart; never a long backoff on the hot path.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.max_connections, timeout=settings.pool_wait_seconds,
        retry=Retry(NoBackoff(), 1), **common)
    return aioredis.Redis(connection_pool=pool)
