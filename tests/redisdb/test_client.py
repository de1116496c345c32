"""The Redis client: bursts wait for a pooled connection; a dead Redis fails fast."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import RedisSettings
from gateway.redisdb.client import REDIS_ERRORS, open_redis
from tests.support.procs import free_port


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing(redis_url: str) -> None:
    client = open_redis(RedisSettings(url=redis_url, max_connections=16))
    try:
        results = await asyncio.gather(*(client.incr("burst") for _ in range(2000)), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert int(await client.get("burst")) == 2000
    finally:
        await client.aclose()


async def test_an_unreachable_redis_raises_a_redis_error_quickly() -> None:
    client = open_redis(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.2))
    try:
        with pytest.raises(REDIS_ERRORS):
            await asyncio.wait_for(client.ping(), timeout=5)  # bounded by the client's own timeouts
    finally:
        await client.aclose()
