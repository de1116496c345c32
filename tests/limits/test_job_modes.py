"""A job's admission in two halves (admit.lua modes): quotas reserved at submission, pacing at start."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.config import Limits
from gateway.errors import QuotaExceeded, RateLimited
from gateway.limits.limiter import Limiter, SettledUsage, utc_periods
from gateway.redisdb.keys import RedisKeys

KEYS = RedisKeys()
T0 = 1_795_000_000_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def admit(limiter: Limiter, limits: Limits, rid: str, mode: str, now_ms: int = T0, n: int = 1) -> None:
    await limiter.admit(user="alice", limits=limits, request_id=rid, n=n, est_tokens=10, est_usd_micros=0,
                        now_ms=now_ms, mode=mode)


async def test_reserve_checks_quotas_only_and_writes_no_window_or_lease(client: Redis) -> None:
    limiter = Limiter(client, KEYS, lease_ms=600_000)
    limits = Limits(requests_per_minute=1, max_concurrent_requests=1, images_per_day=3)
    for i in range(3):  # per-minute and concurrency limits of 1 do not refuse a reservation
        await admit(limiter, limits, f"job{i}", "reserve")
    with pytest.raises(QuotaExceeded):
        await admit(limiter, limits, "job3", "reserve")
    assert await client.zcard(KEYS.requests_window("alice")) == 0
    assert await client.zcard(KEYS.inflight("alice")) == 0
    day = KEYS.day_usage("alice", utc_periods(T0).day)
    assert int(await client.hget(day, "res_images")) == 3
    await admit(limiter, limits, "job0", "reserve")  # a retried reservation counts once
    assert int(await client.hget(day, "res_images")) == 3


async def test_pace_checks_rate_and_concurrency_but_reserves_nothing_more(client: Redis) -> None:
    limiter = Limiter(client, KEYS, lease_ms=600_000)
    limits = Limits(max_concurrent_requests=1, images_per_day=2)
    await admit(limiter, limits, "job0", "reserve")
    await admit(limiter, limits, "job1", "reserve")
    await admit(limiter, limits, "job0", "pace")  # the day's images are all reserved: pace does not look
    with pytest.raises(RateLimited) as info:
        await admit(limiter, limits, "job1", "pace")
    assert info.value.limit_name == "max_concurrent_requests"
    day = KEYS.day_usage("alice", utc_periods(T0).day)
    assert int(await client.hget(day, "res_images")) == 2
    await admit(limiter, limits, "job0", "pace")  # a re-run of a job still leased is admitted as is


async def test_unknown_mode_is_refused_before_redis(client: Redis) -> None:
    limiter = Limiter(client, KEYS, lease_ms=600_000)
    with pytest.raises(ValueError):
        await admit(limiter, Limits(), "j", "later")


async def test_a_rerun_of_a_settled_job_frees_its_slot_and_counts_nothing_twice(client: Redis) -> None:
    # A job's first run settled, but its result could not be stored: it runs again under the same id.
    limiter = Limiter(client, KEYS, lease_ms=600_000)
    limits = Limits(max_concurrent_requests=1)
    await admit(limiter, limits, "job0", "reserve")
    first = await limiter.admit(user="alice", limits=limits, request_id="job0", n=1, est_tokens=10,
                                est_usd_micros=0, now_ms=T0, mode="pace")
    assert await limiter.settle(first, SettledUsage(images=1, total_tokens=10)) is True
    again = await limiter.admit(user="alice", limits=limits, request_id="job0", n=1, est_tokens=10,
                                est_usd_micros=0, now_ms=T0 + 1000, mode="pace")
    assert await limiter.settle(again, SettledUsage(images=1, total_tokens=10)) is False  # billed once
    assert await client.zcard(KEYS.inflight("alice")) == 0  # but the re-run's slot is free
    day = KEYS.day_usage("alice", utc_periods(T0).day)
    assert int(await client.hget(day, "images")) == 1
    await admit(limiter, limits, "job1", "pace", now_ms=T0 + 2000)  # the user's next job is not held back
