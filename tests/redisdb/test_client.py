"""The Redis client: bursts wait for a pooled connection; a hung Redis times out."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis.exceptions

from gateway.config import RedisSettings
from gateway.redisdb.client import open_redis
from tests.support.procs import RedisServer


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing(redis_url: str) -> None:
    client = open_redis(RedisSettings(url=redis_url, max_connections=16))
    try:
        results = await asyncio.gather(*(client.incr("burst") for _ in range(2000)), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert int(await client.get("burst")) == 2000
    finally:
        await client.aclose()


async def test_a_paused_redis_times_out_a_call_instead_of_hanging() -> None:
    # SIGSTOP: the socket stays open and nothing answers (a closed port would fail at connect instead).
    server = RedisServer().start()
    assert server.proc is not None
    client = open_redis(RedisSettings(url=server.url, timeout_seconds=0.2))
    try:
        assert await client.ping()
        server.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(redis.exceptions.TimeoutError):
            await asyncio.wait_for(client.ping(), timeout=10)  # bounded by the client's own timeout
    finally:
        server.proc.send_signal(signal.SIGCONT)
        await client.aclose()
        server.cleanup()
