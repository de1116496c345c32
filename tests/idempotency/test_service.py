"""Waiting on a running Idempotency-Key, taking over a dead runner's claim, and Redis trouble.

Real redis-server; the service's own polling does the waiting (the tests never sleep).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.config import RedisSettings
from gateway.errors import IdempotencyKeyInUse, IdempotencyKeyReused, ServiceUnavailable
from gateway.idempotency.answers import Answer
from gateway.idempotency.service import Idempotency
from gateway.idempotency.store import IdempotencyStore
from gateway.metering.metrics import Metrics
from gateway.redisdb.client import open_redis
from gateway.redisdb.keys import RedisKeys
from tests.support.procs import free_port

ROUTE = "/v1/images/generations"
ANSWER = Answer(200, (("content-type", "application/json"),), b'{"data":[]}')


def service(client: Any, *, lease: float = 60, wait: float = 30, unguarded: bool = False) -> Idempotency:
    store = IdempotencyStore(client, RedisKeys(), ttl_seconds=600)
    return Idempotency(store, Metrics(CollectorRegistry()), lease_seconds=lease, wait_seconds=wait,
                       serve_unguarded=unguarded)


@pytest.fixture
async def client(redis_url: str) -> Any:
    c = Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_a_waiter_gets_the_answer_the_runner_stores(client: Any) -> None:
    idem = service(client)
    runner = await idem.begin("alice", "k", ROUTE, "fp", "req-1")
    assert runner.replay is None
    waiter = asyncio.create_task(idem.begin("alice", "k", ROUTE, "fp", "req-2"))
    await runner.conclude(ANSWER)
    replay = (await waiter).replay
    assert replay == ANSWER


async def test_a_waiter_runs_the_request_itself_when_the_runner_released_or_died(client: Any) -> None:
    idem = service(client, lease=0.3)
    released = await idem.begin("alice", "k1", ROUTE, "fp", "req-1")
    waiter = asyncio.create_task(idem.begin("alice", "k1", ROUTE, "fp", "req-2"))
    await released.release()
    assert (await waiter).replay is None  # claimed: it runs
    await idem.begin("alice", "k2", ROUTE, "fp", "req-3")  # never concludes: its worker "died"
    taken_over = await idem.begin("alice", "k2", ROUTE, "fp", "req-4")  # waits out the 0.3 s lease
    assert taken_over.replay is None
    await taken_over.conclude(ANSWER)
    assert (await idem.begin("alice", "k2", ROUTE, "fp", "req-5")).replay is not None


async def test_a_waiter_gives_up_with_409_and_another_request_gets_422(client: Any) -> None:
    idem = service(client, wait=0.3)
    await idem.begin("alice", "k", ROUTE, "fp", "req-1")
    with pytest.raises(IdempotencyKeyInUse):
        await idem.begin("alice", "k", ROUTE, "fp", "req-2")
    with pytest.raises(IdempotencyKeyReused):
        await idem.begin("alice", "k", ROUTE, "another", "req-3")
    with pytest.raises(IdempotencyKeyReused):  # the route is part of the request
        await idem.begin("alice", "k", "/v1/images/edits", "fp", "req-4")


async def test_redis_down_is_503_or_unguarded_by_policy() -> None:
    down = open_redis(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens
    with pytest.raises(ServiceUnavailable):
        await service(down).begin("alice", "k", ROUTE, "fp", "req-1")
    unguarded = await service(down, unguarded=True).begin("alice", "k", ROUTE, "fp", "req-1")
    assert unguarded.replay is None and unguarded.tap is None
    await unguarded.conclude(ANSWER)  # nothing to store, no error
    await down.aclose()
