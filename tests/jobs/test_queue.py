"""JobQueue against a real Redis and a three-master Cluster: every multi-key step stays in the user's slot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from gateway.config import Limits
from gateway.jobs.model import IN_PROGRESS, QUEUED, Job, new_job_id, now_ms
from gateway.jobs.queue import JobQueue
from gateway.redisdb.keys import RedisKeys
from tests.support import procs


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def queue(request: pytest.FixtureRequest) -> AsyncIterator[JobQueue]:
    client: Any
    if request.param == "single":
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        cluster: procs.RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        client = RedisCluster.from_url(cluster.url)
        await client.initialize()
    yield JobQueue(client, RedisKeys(), ttl_seconds=3600)
    await client.aclose()


def job(user: str) -> Job:
    return Job(id=new_job_id(), user=user, team=None, key_id="key_x", plan="p",
               limits=Limits(max_concurrent_requests=2), models=None, route="/v1/images/generations",
               body=b'{"prompt": "x"}', n=1, model="gpt-image-1", created_ms=now_ms(), day="2026-11-29",
               month="2026-11")


async def test_submit_read_take_over_finish(queue: JobQueue) -> None:
    a, b = job("alice"), job("bob")
    await queue.submit(a)
    await queue.submit(b)
    assert sorted(await queue.users()) == ["alice", "bob"]
    assert (await queue.waiting())[0] == 2
    entry = await queue.read("alice", "runner-1")
    assert entry is not None and entry.job_id == a.id
    assert await queue.read("alice", "runner-1") is None  # one job: delivered once
    # runner-1 dies: after the idle time another runner takes the entry over.
    taken = await queue.take_over("alice", "runner-2", min_idle_ms=0)
    assert taken is not None and taken.job_id == a.id
    assert await queue.transition("alice", a.id, (QUEUED,), status=IN_PROGRESS)
    assert not await queue.transition("alice", a.id, (QUEUED,), status="failed")  # it has started
    assert (await queue.waiting())[0] == 1
    await queue.done(taken)
    await queue.forget_if_empty("alice")
    assert await queue.users() == ["bob"]
    stored = await queue.get("alice", a.id)
    assert stored is not None and stored.status == IN_PROGRESS and stored.limits.max_concurrent_requests == 2
    assert await queue.get("bob", a.id) is None  # another user's namespace
    assert await queue.owner(a.id) == "alice"


async def test_prune_drops_idle_consumers_holding_nothing_and_keeps_the_busy(queue: JobQueue) -> None:
    a, b = job("alice"), job("alice")
    await queue.submit(a)
    await queue.submit(b)
    finished_by_dead = await queue.read("alice", "dead-runner")  # a runner that finished its job, then ended
    assert finished_by_dead is not None
    await queue.done(finished_by_dead)
    busy = await queue.read("alice", "busy-runner")  # one still working: its entry is pending on it
    assert busy is not None
    stream = queue.keys.job_queue("alice")

    async def consumers() -> set[str]:
        return {c["name"].decode() for c in await queue.redis.xinfo_consumers(stream, "runners")}

    assert await queue.prune("alice", min_idle_ms=3_600_000) == 0  # none idle an hour yet
    assert await consumers() == {"dead-runner", "busy-runner"}
    assert await queue.prune("alice", min_idle_ms=0) == 1
    assert await consumers() == {"busy-runner"}
    # The busy runner's entry was not lost with the pruning: it is still pending, and can be taken over.
    taken = await queue.take_over("alice", "another-runner", min_idle_ms=0)
    assert taken is not None and taken.job_id == busy.job_id
    assert await queue.prune("nobody", min_idle_ms=0) == 0  # no stream: nothing to do, no error
