"""The batcher against a real redis-server: one pipeline per tick, deliberate shedding, the circuit."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.config import RedisSettings
from gateway.redisdb.batcher import Batcher, Shed
from gateway.redisdb.client import open_pipeline_redis
from gateway.redisdb.health import CircuitOpen, Health, RedisUnavailable
from tests.support.procs import RedisServer

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL = "return redis.error_reply('nope')"


async def until(check: object, what: str, within: float = 10.0) -> None:
    """Poll ``check()`` (readiness polling, not a sleep as synchronisation)."""
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not reached in {within} s"
        await asyncio.sleep(0.02)


async def test_a_tick_of_calls_shares_a_few_connections_and_each_gets_its_answer(redis_url: str) -> None:
    # Named: the session's Redis may still hold connections of earlier tests' clients not yet collected.
    client = aioredis.Redis.from_url(redis_url, client_name="tick-of-calls")
    batcher = Batcher(client, connections=2, max_batch=100)
    script = client.register_script(INCR)
    try:
        await client.script_flush()  # the first pipeline meets NOSCRIPT: loaded, then sent again
        replies = await asyncio.gather(*(batcher.run(script, ["n"], [1]) for _ in range(500)))
        assert sorted(int(r) for r in replies) == list(range(1, 501))
        names = [c["name"] for c in await client.client_list() if c["name"] == "tick-of-calls"]
        assert 2 <= len(names) <= 3  # two pipelines and this CLIENT LIST, not one connection per call
    finally:
        await client.aclose()


async def test_a_script_error_fails_only_its_own_call(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client)
    good, bad = client.register_script(INCR), client.register_script(FAIL)
    try:
        results = await asyncio.gather(batcher.run(good, ["n"], [2]), batcher.run(bad, ["n"], []),
                                       return_exceptions=True)
        assert int(results[0]) == 2  # type: ignore[arg-type]
        assert isinstance(results[1], ResponseError) and "nope" in str(results[1])
    finally:
        await client.aclose()


async def test_an_admission_past_its_deadline_is_shed_and_never_sent(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client)
    script = client.register_script(INCR)
    try:
        with pytest.raises(Shed) as shed:
            await batcher.run(script, ["n"], [1], deadline=time.monotonic() - 1)
        assert shed.value.reason == "deadline"
        assert await client.get("n") is None
        assert int(await batcher.run(script, ["n"], [1])) == 1  # a settlement (no deadline) is never shed
    finally:
        await client.aclose()


async def test_a_full_queue_sheds_and_a_stalled_redis_trips_the_circuit(pausable_redis: RedisServer) -> None:
    client = open_pipeline_redis(RedisSettings(url=pausable_redis.url, pipeline_connections=1))
    health = Health(client.ping, interval=0.1, timeout=0.3, failures=2)
    batcher = Batcher(client, connections=1, max_queue=2, health=health)
    script = client.register_script(INCR)
    assert pausable_redis.proc is not None
    try:
        assert int(await batcher.run(script, ["n"], [1])) == 1
        pausable_redis.proc.send_signal(signal.SIGSTOP)
        in_flight = asyncio.ensure_future(batcher.run(script, ["n"], [1], deadline=time.monotonic() + 60))
        await until(lambda: batcher.queued == 0 and batcher._busy == 1, "the first call in flight")
        queued = [asyncio.ensure_future(batcher.run(script, ["n"], [1], deadline=time.monotonic() + 60))
                  for _ in range(2)]
        await until(lambda: batcher.queued == 2, "two calls queued")
        with pytest.raises(Shed) as shed:
            await batcher.run(script, ["n"], [1], deadline=time.monotonic() + 60)
        assert shed.value.reason == "queue_full"

        health.start()
        await until(lambda: health.open, "circuit open")
        with pytest.raises(RedisUnavailable):
            await in_flight  # sent: its script may have run
        for call in queued:
            with pytest.raises(CircuitOpen):
                await call  # never sent
        with pytest.raises(CircuitOpen):
            await batcher.run(script, ["n"], [1])

        pausable_redis.proc.send_signal(signal.SIGCONT)
        await until(lambda: not health.open, "circuit closed")
        assert int(await batcher.run(script, ["n"], [0])) >= 1
    finally:
        pausable_redis.proc.send_signal(signal.SIGCONT)
        await health.close()
        await client.aclose()


async def test_pings_slower_than_the_timeout_do_not_trip_while_pipelines_answer() -> None:
    """A saturated event loop delays pings, but pipelines still answering prove Redis is there."""
    async def slow_ping() -> None:
        await asyncio.sleep(1)

    async def pipelines_answering() -> None:
        while True:
            health.replied()
            await asyncio.sleep(0.005)

    health = Health(slow_ping, interval=0.01, timeout=0.05, failures=1)
    answering = asyncio.ensure_future(pipelines_answering())
    for _ in range(3):
        assert not await health.check()
    assert not health.open
    answering.cancel()
    assert not await health.check()  # and now nothing answers at all
    assert health.open


async def test_calls_after_a_redis_restart_succeed_on_the_first_try(pausable_redis: RedisServer) -> None:
    """A restart breaks every held connection: the next calls must not fail on the stale ones."""
    client = open_pipeline_redis(RedisSettings(url=pausable_redis.url, pipeline_connections=4))
    batcher = Batcher(client, connections=4, max_batch=1)
    script = client.register_script(INCR)
    try:
        # Four batches at once: four connections held by the batcher.
        await asyncio.gather(*(batcher.run(script, ["n"], [1]) for _ in range(4)))
        pausable_redis.stop()
        pausable_redis.start()  # same port, empty (no persistence): every held connection is now dead
        for i in range(4):  # one at a time: each is a batch of its own
            assert int(await batcher.run(script, ["n"], [1])) == i + 1
    finally:
        await batcher.close()
        await client.aclose()
