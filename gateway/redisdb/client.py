"""The Redis clients: standalone or Cluster; one for single calls, one for the batcher's pipelines."""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry  # the asyncio one: redis.retry.Retry would not await (no retry)
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import RedisSettings

# Everything that means "Redis did not answer": RedisClusterException is not a RedisError in redis-py.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


def open_redis(settings: RedisSettings) -> Any:
    """A client whose calls fail fast (``redis.timeout_seconds``): keys, the auth guard, readiness."""
    return _open(settings, max_connections=settings.max_connections, socket_timeout=settings.timeout_seconds,
                 pool_wait=settings.pool_wait_seconds)


def open_pipeline_redis(settings: RedisSettings) -> Any:
    """The few long-lived connections of the batcher (``Batcher``) and its health pings.

    No read timeout: a burst's pipelines wait on a busy event loop as long as Redis answers;
    whether it answers is the health pinger's call (``Health``), never one slow read's.
    Two connections beyond the pipelines' own, so a ping or a SCRIPT LOAD never waits for one.
    """
    return _open(settings, max_connections=settings.pipeline_connections + 2, socket_timeout=None,
                 pool_wait=None)


def _open(settings: RedisSettings, *, max_connections: int, socket_timeout: float | None,
          pool_wait: float | None) -> Any:
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": settings.timeout_seconds,
        "decode_responses": False,
    }
    if settings.cluster:
        return RedisCluster.from_url(settings.url, max_connections=max_connections, **common)
    # A burst larger than the pool waits for a free connection (``pool_wait``; None: as long as it takes)
    # instead of failing with "Too many connections" as the default pool does.
    # One quick retry for a connection dropped by a Redis restart; never a long backoff on the hot path.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url, max_connections=max_connections, timeout=pool_wait, retry=Retry(NoBackoff(), 1), **common)
    # Whatever the URL chose (TCP, TLS, unix socket), with hiredis packing the commands.
    pool.connection_class = type(f"Hiredis{pool.connection_class.__name__}",
                                 (HiredisPacking, pool.connection_class), {})
    return aioredis.Redis(connection_pool=pool)


class HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's asyncio Python packer.

    Measured (bench/RESULTS.md, redis client section): an admit's EVALSHA with 23 arguments
    packs in about a seventh of the time. (redis-py's sync client already does this; its
    asyncio connection does not.) The Cluster client keeps redis-py's packer: it fixes its
    connection class.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # "SCRIPT LOAD": Redis wants the words as separate arguments
            args = (*args[0].encode().split(), *args[1:])
        return [hiredis.pack_command(args)]
