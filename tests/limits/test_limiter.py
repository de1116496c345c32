"""Limiter against a real Redis and a three-master Redis Cluster: windows, concurrency, quotas, settle.

Time is passed in (``now_ms``), so tests move the clock instead of waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from gateway.config import Limits
from gateway.errors import QuotaExceeded, RateLimited
from gateway.limits.limiter import Admission, Limiter, SettledUsage, go_duration, utc_periods
from gateway.redisdb.keys import RedisKeys
from tests.support import procs

KEYS = RedisKeys()
LEASE = 600_000
HIGH_1024 = 4160  # gpt-image-1 high 1024x1024 output tokens


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp() * 1000)


T0 = ms("2026-11-24T12:00:00")
ROOT = str(Path(__file__).resolve().parents[2])
ADMIT_SHA = hashlib.sha1(resources.files("gateway.limits").joinpath("lua", "admit.lua").read_bytes()).hexdigest()


@dataclass
class Backend:
    client: Redis | RedisCluster
    url: str
    cluster: bool


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """An empty Redis: the session's private server, or the module's three-master Cluster."""
    if request.param == "single":
        url = request.getfixturevalue("redis_url")
        b = Backend(Redis.from_url(url), url, cluster=False)
    else:
        cluster: procs.RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        client = RedisCluster.from_url(cluster.url)
        # As the app's lifespan does: without it, a burst of first commands is routed before the
        # slot map is known, gets MOVED, and redis-py 8.1 re-maps while connections are opening
        # (some fail with AttributeError: 'NoneType' object has no attribute 'writelines').
        await client.initialize()
        b = Backend(client, cluster.url, cluster=True)
    yield b
    await b.client.aclose()


@pytest.fixture
def limiter(backend: Backend) -> Limiter:
    return Limiter(backend.client, KEYS, lease_ms=LEASE)


async def admit(limiter: Limiter, limits: Limits, rid: str, now_ms: int, *, user: str = "alice", n: int = 1,
                tokens: int = 0, usd: int = 0) -> Admission:
    return await limiter.admit(user=user, limits=limits, request_id=rid, n=n, est_tokens=tokens,
                               est_usd_micros=usd, now_ms=now_ms)


async def refused(limiter: Limiter, limits: Limits, rid: str, now_ms: int,
                  **kw: int) -> RateLimited | QuotaExceeded:
    with pytest.raises((RateLimited, QuotaExceeded)) as info:
        await admit(limiter, limits, rid, now_ms, **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, RateLimited | QuotaExceeded)
    return info.value


async def usage(client: Redis | RedisCluster, key: str) -> dict[str, int]:
    return {_text(k): int(v) for k, v in (await client.hgetall(key)).items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- per-minute windows and concurrency -----------------------------------------------------------


async def test_50_simultaneous_admits_admit_exactly_the_limit(limiter: Limiter) -> None:
    limits = Limits(requests_per_minute=5)
    results = await asyncio.gather(*(admit(limiter, limits, f"r{i}", T0) for i in range(50)),
                                   return_exceptions=True)
    admitted = [r for r in results if isinstance(r, Admission)]
    limited = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 5 and len(limited) == 45
    for exc in limited:
        assert exc.status == 429 and exc.code == "rate_limit_exceeded"
        assert exc.limit_name == "requests_per_minute"
        assert int(exc.headers["retry-after"]) >= 1
        assert 1 <= int(exc.headers["retry-after-ms"]) <= 60_000


WORKER = r"""
import asyncio, json, sys
from redis.asyncio import Redis, RedisCluster
from gateway.config import Limits
from gateway.errors import RateLimited
from gateway.limits.limiter import Limiter
from gateway.redisdb.keys import RedisKeys

async def main(url, cluster, now_ms, tag):
    client = (RedisCluster if cluster == "1" else Redis).from_url(url)
    if cluster == "1":
        await client.initialize()
    limiter = Limiter(client, RedisKeys(), lease_ms=600_000)
    await client.rpush("test:ready", tag)
    await client.blpop(["test:go"], timeout=60)  # start together with the other process

    async def one(i):
        try:
            await limiter.admit(user="alice", limits=Limits(requests_per_minute=5), request_id=f"{tag}-{i}",
                                n=1, est_tokens=0, est_usd_micros=0, now_ms=int(now_ms))
            return None
        except RateLimited as exc:
            return int(exc.headers["retry-after"])

    print(json.dumps(await asyncio.gather(*(one(i) for i in range(25)))))
    await client.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_processes_admit_exactly_the_limit(backend: Backend) -> None:
    root = ROOT
    env = {**os.environ, "PYTHONPATH": root}
    workers = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, backend.url, "1" if backend.cluster else "0", str(T0), f"p{i}",
        stdout=asyncio.subprocess.PIPE, env=env, cwd=root) for i in range(2)]
    for _ in workers:  # both connected and waiting: a barrier through Redis, not a sleep
        assert await backend.client.blpop(["test:ready"], timeout=60) is not None
    await backend.client.rpush("test:go", "go", "go")
    outputs = [await w.communicate() for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    results = [r for out, _ in outputs for r in json.loads(out)]
    assert len(results) == 50
    assert results.count(None) == 5
    assert all(r is None or r >= 1 for r in results)


async def test_window_is_exact_at_its_edge(limiter: Limiter) -> None:
    limits = Limits(requests_per_minute=5)
    for i in range(5):
        await admit(limiter, limits, f"r{i}", T0)
    exc = await refused(limiter, limits, "late", T0 + 59_999)
    assert exc.headers == {"retry-after": "1", "retry-after-ms": "1"}
    for i in range(5):  # at T0 + 60 s all five entries of T0 have left the window
        await admit(limiter, limits, f"s{i}", T0 + 60_000)
    exc = await refused(limiter, limits, "again", T0 + 60_000)
    assert exc.headers == {"retry-after": "60", "retry-after-ms": "60000"}
    assert isinstance(exc, RateLimited) and exc.limit_name == "requests_per_minute"


async def test_a_request_stamped_before_the_oldest_admission_waits_at_most_the_window(limiter: Limiter) -> None:
    """Requests are stamped on arrival and admitted in another order: the wait never exceeds 60 s."""
    limits = Limits(requests_per_minute=2)
    for i in range(2):
        await admit(limiter, limits, f"r{i}", T0 + 5)
    exc = await refused(limiter, limits, "arrived-earlier", T0)
    assert exc.headers == {"retry-after": "60", "retry-after-ms": "60000"}


async def test_window_that_straddles_frees_exactly_the_old_entries(limiter: Limiter) -> None:
    limits = Limits(requests_per_minute=5)
    for i in range(3):
        await admit(limiter, limits, f"a{i}", T0)
    for i in range(2):
        await admit(limiter, limits, f"b{i}", T0 + 30_000)
    await refused(limiter, limits, "x", T0 + 59_999)
    for i in range(3):
        await admit(limiter, limits, f"c{i}", T0 + 61_000)
    exc = await refused(limiter, limits, "d", T0 + 61_000)
    # The two entries of T0 + 30 s are the oldest now; the first leaves at T0 + 90 s.
    assert exc.headers == {"retry-after": "29", "retry-after-ms": "29000"}


async def test_images_per_minute_counts_n(limiter: Limiter) -> None:
    limits = Limits(images_per_minute=10)
    await admit(limiter, limits, "a", T0, n=4)
    await admit(limiter, limits, "b", T0, n=4)
    exc = await refused(limiter, limits, "c", T0, n=4)
    assert isinstance(exc, RateLimited) and exc.limit_name == "images_per_minute"
    await admit(limiter, limits, "d", T0, n=2)
    await refused(limiter, limits, "e", T0, n=1)
    exc = await refused(limiter, limits, "too-many", T0, n=11)  # can never fit
    assert exc.headers["retry-after-ms"] == "60000"


async def test_images_retry_after_waits_for_enough_images_to_leave(limiter: Limiter) -> None:
    limits = Limits(images_per_minute=10)
    await admit(limiter, limits, "a", T0, n=2)
    await admit(limiter, limits, "b", T0 + 10_000, n=2)
    await admit(limiter, limits, "c", T0 + 20_000, n=6)
    exc = await refused(limiter, limits, "d", T0 + 30_000, n=3)
    # 3 images must leave: the two of T0 (at T0 + 60 s) and one of T0 + 10 s (at T0 + 70 s).
    assert exc.headers == {"retry-after": "40", "retry-after-ms": "40000"}
    await refused(limiter, limits, "d", T0 + 69_999, n=3)
    await admit(limiter, limits, "d", T0 + 70_000, n=3)


async def test_max_concurrent_requests(limiter: Limiter) -> None:
    limits = Limits(max_concurrent_requests=2)
    a = await admit(limiter, limits, "a", T0)
    await admit(limiter, limits, "b", T0 + 1)
    exc = await refused(limiter, limits, "c", T0 + 2)
    assert isinstance(exc, RateLimited) and exc.limit_name == "max_concurrent_requests"
    assert int(exc.headers["retry-after"]) >= 1
    assert await limiter.settle(a, SettledUsage())
    await admit(limiter, limits, "c", T0 + 3)
    await refused(limiter, limits, "d", T0 + 4)
    # b and c are never settled (their worker was killed): their slots expire with the lease.
    await refused(limiter, limits, "d", T0 + 1 + LEASE - 1)
    await admit(limiter, limits, "d", T0 + 3 + LEASE)
    await admit(limiter, limits, "e", T0 + 3 + LEASE)
    await refused(limiter, limits, "f", T0 + 3 + LEASE)


async def test_checks_run_in_the_documented_order(limiter: Limiter) -> None:
    limits = Limits(max_concurrent_requests=1, requests_per_minute=1, images_per_minute=1, tokens_per_day=10)
    first = await admit(limiter, limits, "a", T0, tokens=10)
    exc = await refused(limiter, limits, "b", T0, tokens=10)
    assert exc.limit_name == "max_concurrent_requests"
    await limiter.settle(first, SettledUsage(total_tokens=10, images=1))
    assert (await refused(limiter, limits, "b", T0, tokens=10)).limit_name == "requests_per_minute"
    limits = Limits(images_per_minute=1, tokens_per_day=10)
    assert (await refused(limiter, limits, "b", T0, tokens=10)).limit_name == "images_per_minute"
    assert (await refused(limiter, limits, "b", T0 + 60_000, tokens=10)).limit_name == "tokens_per_day"


async def test_refused_request_writes_nothing(backend: Backend, limiter: Limiter) -> None:
    await admit(limiter, Limits(), "a", T0, n=2, tokens=100, usd=5)
    keys = sorted(await backend.client.keys("*"))
    before = {k: await backend.client.dump(k) for k in keys}
    await refused(limiter, Limits(tokens_per_day=150), "b", T0 + 1, n=2, tokens=100, usd=5)
    assert sorted(await backend.client.keys("*")) == keys
    assert {k: await backend.client.dump(k) for k in keys} == before


async def test_retried_admit_counts_once(backend: Backend, limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=10_000, requests_per_minute=3)
    await admit(limiter, limits, "a", T0, tokens=HIGH_1024)
    await admit(limiter, limits, "a", T0, tokens=HIGH_1024)  # the first reply was lost
    day = await usage(backend.client, KEYS.day_usage("alice", "2026-11-24"))
    assert day["res_tokens"] == HIGH_1024
    await admit(limiter, limits, "b", T0, tokens=HIGH_1024)


async def test_admission_headers(limiter: Limiter) -> None:
    limits = Limits(requests_per_minute=5, images_per_minute=10, tokens_per_day=10_000)
    a = await admit(limiter, limits, "a", T0, n=2, tokens=HIGH_1024)
    assert a.headers == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-images": "10", "x-ratelimit-remaining-images": "8",
        "x-ratelimit-reset-images": "1m0s",
        "x-ratelimit-limit-tokens": "10000", "x-ratelimit-remaining-tokens": str(10_000 - HIGH_1024),
        "x-ratelimit-reset-tokens": "12h0m0s",
    }
    b = await admit(limiter, limits, "b", T0 + 1_500, n=1, tokens=100)
    assert b.headers["x-ratelimit-remaining-requests"] == "3"
    assert b.headers["x-ratelimit-reset-requests"] == "58.5s"  # when the entry of T0 leaves
    assert b.headers["x-ratelimit-remaining-images"] == "7"
    assert b.headers["x-ratelimit-remaining-tokens"] == str(10_000 - HIGH_1024 - 100)
    monthly = await admit(limiter, Limits(tokens_per_month=1_000_000), "c", T0, tokens=0)
    assert monthly.headers == {"x-ratelimit-limit-tokens": "1000000",
                               "x-ratelimit-remaining-tokens": str(1_000_000 - HIGH_1024 - 100),
                               "x-ratelimit-reset-tokens": "156h0m0s"}  # 6.5 days to 2026-12-01
    assert (await admit(limiter, Limits(), "d", T0)).headers == {}


async def test_keys_of_one_user_share_counters(limiter: Limiter) -> None:
    plan = Limits(requests_per_minute=3)
    key_a = plan.merged({"images_per_minute": 100})
    key_b = plan.merged({"max_concurrent_requests": 10})
    await admit(limiter, key_a, "a1", T0)
    await admit(limiter, key_b, "b1", T0)
    await admit(limiter, key_a, "a2", T0)
    await refused(limiter, key_b, "b2", T0)
    await refused(limiter, key_a, "a3", T0)
    await admit(limiter, key_a, "other", T0, user="bob")  # another user has their own counters


def test_every_key_of_a_user_is_in_one_slot() -> None:
    keys = [KEYS.requests_window("alice"), KEYS.images_window("alice"), KEYS.inflight("alice"),
            KEYS.reservations("alice"), KEYS.day_usage("alice", "2026-11-24"),
            KEYS.month_usage("alice", "2026-11"), KEYS.settled("alice", "req-1"), KEYS.ledger("alice")]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert key_slot(KEYS.ledger("bob").encode()) != key_slot(KEYS.ledger("alice").encode())


# --- quotas -------------------------------------------------------------------------------------------


async def test_tokens_per_day_admits_exactly_what_fits(limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=10_000)
    results = await asyncio.gather(
        *(admit(limiter, limits, f"r{i}", T0, tokens=HIGH_1024) for i in range(10)), return_exceptions=True)
    assert sum(isinstance(r, Admission) for r in results) == 2
    quota = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(quota) == 8
    exc = quota[0]
    assert exc.status == 429 and exc.code == "insufficient_quota" and exc.limit_name == "tokens_per_day"
    assert exc.headers == {"x-should-retry": "false"}
    assert exc.message == ("You exceeded your tokens_per_day quota (10000 tokens); "
                           "it resets at 2026-11-25T00:00:00Z.")


async def test_settle_with_lower_usage_frees_room(limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=10_000)
    a = await admit(limiter, limits, "a", T0, tokens=HIGH_1024)
    await admit(limiter, limits, "b", T0, tokens=HIGH_1024)
    await refused(limiter, limits, "c", T0, tokens=HIGH_1024)
    await limiter.settle(a, SettledUsage(input_text_tokens=20, output_tokens=980, total_tokens=1000,
                                         images=1))
    await admit(limiter, limits, "c", T0, tokens=HIGH_1024)  # 1000 used + 4160 + 4160 reserved
    await refused(limiter, limits, "d", T0, tokens=HIGH_1024)


async def test_failed_call_gives_its_reservation_back(backend: Backend, limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=10_000)
    a = await admit(limiter, limits, "a", T0, tokens=HIGH_1024)
    await admit(limiter, limits, "b", T0, tokens=HIGH_1024)
    await refused(limiter, limits, "c", T0, tokens=HIGH_1024)
    assert await limiter.release(a)
    await admit(limiter, limits, "c", T0, tokens=HIGH_1024)
    day = await usage(backend.client, KEYS.day_usage("alice", "2026-11-24"))
    assert day["requests"] == 1 and day["total_tokens"] == 0 and day["res_tokens"] == 2 * HIGH_1024


def unsettled(rid: str, tokens: int) -> dict[str, str]:
    return {"request_id": rid, "user": "alice", "total_tokens": str(tokens), "settled": "false"}


async def ledger(backend: Backend) -> list[dict[str, str]]:
    entries = await backend.client.xrange(KEYS.ledger("alice"))
    return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]


async def test_expired_lease_keeps_its_estimate_and_writes_an_unsettled_record(
        backend: Backend, limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=10_000)
    a = await limiter.admit(user="alice", limits=limits, request_id="a", n=1, est_tokens=HIGH_1024,
                            est_usd_micros=7, now_ms=T0, record=unsettled("a", HIGH_1024))
    await admit(limiter, limits, "b", T0, tokens=HIGH_1024)  # no record given: the quota still keeps it
    await refused(limiter, limits, "c", T0 + LEASE - 1, tokens=HIGH_1024)
    # a and b's worker died: their leases expire at the next admit, their estimates stay on the quota.
    await refused(limiter, limits, "c", T0 + LEASE, tokens=HIGH_1024)
    day_key = KEYS.day_usage("alice", "2026-11-24")
    day = await usage(backend.client, day_key)
    assert (day["res_tokens"], day["total_tokens"], day["requests"], day["images"], day["usd_micros"]) == \
        (0, 2 * HIGH_1024, 2, 2, 7)
    assert await ledger(backend) == [unsettled("a", HIGH_1024)]
    assert await backend.client.zcard(KEYS.inflight("alice")) == 0
    # A settle that comes after the record (the worker was only slow) counts nothing twice.
    assert not await limiter.settle(a, SettledUsage(total_tokens=3000, images=1), {"request_id": "a"})
    assert await usage(backend.client, day_key) == day
    assert len(await ledger(backend)) == 1


async def test_sweep_records_expired_leases_of_a_user_who_sends_nothing_more(
        backend: Backend, limiter: Limiter) -> None:
    limits = Limits(tokens_per_month=100_000)
    for rid in ("a", "b"):
        await limiter.admit(user="alice", limits=limits, request_id=rid, n=2, est_tokens=HIGH_1024,
                            est_usd_micros=0, now_ms=T0, record=unsettled(rid, HIGH_1024))
    c = await admit(limiter, limits, "c", T0 + 1000, tokens=HIGH_1024)
    assert await limiter.sweep("alice", T0 + LEASE - 1) == 0
    assert await limiter.sweep("alice", T0 + LEASE) == 2  # c's lease ends a second later
    assert await limiter.sweep("alice", T0 + LEASE) == 0
    assert [r["request_id"] for r in await ledger(backend)] == ["a", "b"]
    month = await usage(backend.client, KEYS.month_usage("alice", "2026-11"))
    assert (month["total_tokens"], month["images"], month["res_tokens"]) == (2 * HIGH_1024, 4, HIGH_1024)
    assert await limiter.settle(c, SettledUsage(total_tokens=100, images=1))
    assert await limiter.sweep("alice", T0 + 2 * LEASE) == 0


async def test_a_renewed_lease_keeps_its_slot_and_reservation(backend: Backend, limiter: Limiter) -> None:
    limits = Limits(max_concurrent_requests=1, tokens_per_day=5000)
    a = await admit(limiter, limits, "a", T0, tokens=HIGH_1024)
    assert await limiter.renew(a, T0 + LEASE - 1)  # a long stream, still running
    exc = await refused(limiter, limits, "b", T0 + LEASE + 1, tokens=10)  # not taken for a dead worker's
    assert exc.limit_name == "max_concurrent_requests"
    assert (await usage(backend.client, KEYS.day_usage("alice", "2026-11-24")))["res_tokens"] == HIGH_1024
    assert await limiter.settle(a, SettledUsage(total_tokens=100))
    assert not await limiter.renew(a, T0 + LEASE + 2)  # settled: the lease is never created again
    assert await backend.client.zscore(KEYS.inflight("alice"), "a") is None


async def test_unsettled_reservation_outlives_its_lease_until_reclaimed(backend: Backend, limiter: Limiter) -> None:
    """The reservation must still be there to give back when the user's next admit comes, however late."""
    limits = Limits(tokens_per_month=10_000)
    await admit(limiter, limits, "a", T0, tokens=HIGH_1024)  # never settled: its worker died
    for key in (KEYS.inflight("alice"), KEYS.reservations("alice")):
        assert await backend.client.pttl(key) > 31 * 86_400_000  # not gone when the lease ends
    later = T0 + 3 * 86_400_000  # days later, same month
    await admit(limiter, limits, "b", later, tokens=HIGH_1024)
    assert (await usage(backend.client, KEYS.month_usage("alice", "2026-11")))["res_tokens"] == HIGH_1024


async def test_day_edge(backend: Backend, limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=10_000)
    last_ms = ms("2026-11-24T23:59:59.999")
    a = await admit(limiter, limits, "a", last_ms, tokens=HIGH_1024)
    await limiter.settle(a, SettledUsage(total_tokens=9000))  # settled after midnight: still day D
    exc = await refused(limiter, limits, "b", last_ms, tokens=HIGH_1024)
    assert "it resets at 2026-11-25T00:00:00Z" in exc.message
    b = await admit(limiter, limits, "b", last_ms + 1, tokens=HIGH_1024)
    assert b.day == "2026-11-25"
    assert (await usage(backend.client, KEYS.day_usage("alice", "2026-11-24")))["total_tokens"] == 9000
    assert (await usage(backend.client, KEYS.day_usage("alice", "2026-11-25")))["res_tokens"] == HIGH_1024


async def test_month_edge(backend: Backend, limiter: Limiter) -> None:
    limits = Limits(tokens_per_month=10_000)
    last_ms = ms("2026-11-30T23:59:59.999")
    a = await admit(limiter, limits, "a", ms("2026-11-02T08:00:00"), tokens=HIGH_1024)
    await limiter.settle(a, SettledUsage(total_tokens=9000))
    exc = await refused(limiter, limits, "b", last_ms, tokens=HIGH_1024)
    assert exc.message == ("You exceeded your tokens_per_month quota (10000 tokens); "
                           "it resets at 2026-12-01T00:00:00Z.")
    await admit(limiter, limits, "b", last_ms + 1, tokens=HIGH_1024)
    assert (await usage(backend.client, KEYS.month_usage("alice", "2026-11")))["total_tokens"] == 9000


async def test_images_per_day_and_month(limiter: Limiter) -> None:
    per_day = Limits(images_per_day=5)
    a = await admit(limiter, per_day, "a", T0, n=3)
    assert (await refused(limiter, per_day, "b", T0, n=3)).limit_name == "images_per_day"
    b = await admit(limiter, per_day, "b", T0, n=2)
    await limiter.settle(a, SettledUsage(images=3))
    await limiter.settle(b, SettledUsage(images=2))
    await refused(limiter, per_day, "c", T0 + 1, n=1)
    await admit(limiter, per_day, "c", T0 + 86_400_000, n=3)  # next day
    per_month = Limits(images_per_month=9)
    exc = await refused(limiter, per_month, "d", T0 + 86_400_000, n=2)  # 3 + 2 + 3 this month
    assert exc.limit_name == "images_per_month"
    assert exc.message == ("You exceeded your images_per_month quota (9 images); "
                           "it resets at 2026-12-01T00:00:00Z.")


async def test_usd_per_month(limiter: Limiter) -> None:
    limits = Limits(usd_per_month=1.0)
    a = await admit(limiter, limits, "a", T0, usd=400_000)
    await admit(limiter, limits, "b", T0, usd=400_000)
    exc = await refused(limiter, limits, "c", T0, usd=400_000)
    assert exc.limit_name == "usd_per_month"
    assert exc.message == "You exceeded your usd_per_month quota (1 USD); it resets at 2026-12-01T00:00:00Z."
    await limiter.settle(a, SettledUsage(usd_micros=200_000))
    await admit(limiter, limits, "c", T0, usd=400_000)  # 0.2 used + 0.8 reserved: exactly 1.0 fits
    await refused(limiter, limits, "d", T0, usd=1)


# --- settle -----------------------------------------------------------------------------------------


async def test_settle_is_idempotent_and_writes_the_aggregates(backend: Backend, limiter: Limiter) -> None:
    limits = Limits(tokens_per_day=100_000, max_concurrent_requests=1)
    a = await admit(limiter, limits, "a", T0, n=2, tokens=2 * HIGH_1024, usd=340_000)
    done = SettledUsage(input_text_tokens=50, input_image_tokens=200, output_tokens=8320, total_tokens=8570,
                        images=2, usd_micros=338_250)
    record = {"request_id": "a", "user": "alice", "status": "200", "total_tokens": "8570"}
    assert await limiter.settle(a, done, record) is True
    expected = {"requests": 1, "images": 2, "input_tokens": 250, "input_text_tokens": 50,
                "input_image_tokens": 200, "output_tokens": 8320, "total_tokens": 8570, "usd_micros": 338_250,
                "res_tokens": 0, "res_images": 0, "res_usd_micros": 0}
    day_key, month_key = KEYS.day_usage("alice", "2026-11-24"), KEYS.month_usage("alice", "2026-11")
    assert await usage(backend.client, day_key) == expected
    assert await usage(backend.client, month_key) == expected
    assert await limiter.settle(a, done, record) is False
    assert await limiter.release(a, record) is False
    assert await usage(backend.client, day_key) == expected
    entries = await backend.client.xrange(KEYS.ledger("alice"))
    records = [{_text(k): _text(v) for k, v in (fields or {}).items()} for _, fields in entries or []]
    assert records == [record]
    assert 399 * 86_400 < await backend.client.ttl(day_key) <= 400 * 86_400
    assert 799 * 86_400 < await backend.client.ttl(month_key) <= 800 * 86_400
    await admit(limiter, limits, "b", T0)  # the slot was freed once


async def test_settle_without_record_appends_nothing(backend: Backend, limiter: Limiter) -> None:
    a = await admit(limiter, Limits(), "a", T0)
    assert await limiter.settle(a, SettledUsage(total_tokens=5))
    assert await backend.client.exists(KEYS.ledger("alice")) == 0
    assert (await usage(backend.client, KEYS.day_usage("alice", "2026-11-24")))["requests"] == 1


async def test_bad_amounts_are_refused_before_redis(limiter: Limiter) -> None:
    with pytest.raises(ValueError, match="est_tokens"):
        await admit(limiter, Limits(), "a", T0, tokens=-1)
    a = await admit(limiter, Limits(), "a", T0)
    with pytest.raises(ValueError, match="usd_micros"):
        await limiter.settle(a, SettledUsage(usd_micros=1.5))  # type: ignore[arg-type]
    assert await limiter.settle(a, SettledUsage(usd_micros=2))  # the bad call marked nothing settled


# --- Redis restarts -------------------------------------------------------------------------------------


async def test_admit_after_script_flush(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    limiter = Limiter(client, KEYS, lease_ms=LEASE)
    a = await admit(limiter, Limits(requests_per_minute=2), "a", T0)
    await client.script_flush()
    assert await client.script_exists(ADMIT_SHA) == [False]
    await admit(limiter, Limits(requests_per_minute=2), "b", T0)
    await refused(limiter, Limits(requests_per_minute=2), "c", T0)
    await client.script_flush()
    assert await limiter.settle(a, SettledUsage())
    await client.aclose()


async def test_admit_after_redis_restarted_empty() -> None:
    server = procs.RedisServer().start()
    try:
        client = Redis.from_url(server.url)
        limiter = Limiter(client, KEYS, lease_ms=LEASE)
        await admit(limiter, Limits(requests_per_minute=1), "a", T0)
        server.stop()
        server.start()  # same port, no persistence: scripts and data are gone
        await client.connection_pool.disconnect()  # drop the dead sockets: this test is about the scripts
        assert await client.script_exists(ADMIT_SHA) == [False]
        a = await admit(limiter, Limits(requests_per_minute=1), "b", T0)
        assert await limiter.settle(a, SettledUsage())
        await client.aclose()
    finally:
        server.cleanup()


# --- helpers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [
    (0, "0s"), (1, "1ms"), (500, "500ms"), (1000, "1s"), (1500, "1.5s"), (59_500, "59.5s"),
    (60_000, "1m0s"), (360_000, "6m0s"), (61_050, "1m1.05s"), (3_723_004, "1h2m3.004s"), (-1500, "-1.5s"),
])
def test_go_duration(value: int, text: str) -> None:
    assert go_duration(value) == text


def test_utc_periods() -> None:
    p = utc_periods(ms("2026-11-24T23:59:59.999"))
    assert (p.day, p.month) == ("2026-11-24", "2026-11")
    assert p.day_end_ms == ms("2026-11-25T00:00:00") and p.month_end_ms == ms("2026-12-01T00:00:00")
    p = utc_periods(ms("2026-12-31T00:00:00"))
    assert p.month == "2026-12" and p.month_end_ms == ms("2027-01-01T00:00:00")
    p = utc_periods(ms("2028-02-29T12:00:00"))
    assert p.day == "2028-02-29" and p.month_end_ms == ms("2028-03-01T00:00:00")


# --- cancel (admit ran, but its answer was lost) ---------------------------------------------------


async def test_cancel_undoes_an_admission_whose_answer_was_lost(backend: Backend, limiter: Limiter) -> None:
    limits = Limits(requests_per_minute=1, images_per_minute=2, max_concurrent_requests=1, tokens_per_day=5000)
    await admit(limiter, limits, "lost", T0, n=2, tokens=HIGH_1024)
    assert await limiter.cancel(user="alice", request_id="lost", n=2, now_ms=T0)
    await admit(limiter, limits, "next", T0 + 1, n=2, tokens=HIGH_1024)  # slot, windows, quota all free again
    day = await usage(backend.client, KEYS.day_usage("alice", "2026-11-24"))
    assert day["res_tokens"] == HIGH_1024 and day.get("requests", 0) == 0


async def test_cancel_of_an_admission_that_never_ran_or_was_settled_changes_nothing(
        backend: Backend, limiter: Limiter) -> None:
    assert not await limiter.cancel(user="alice", request_id="never", n=1, now_ms=T0)
    limits = Limits(tokens_per_day=10_000)
    a = await admit(limiter, limits, "done", T0, tokens=HIGH_1024)
    await limiter.settle(a, SettledUsage(total_tokens=100, images=1))
    assert not await limiter.cancel(user="alice", request_id="done", n=1, now_ms=T0)
    day = await usage(backend.client, KEYS.day_usage("alice", "2026-11-24"))
    assert day["total_tokens"] == 100 and day["requests"] == 1


# --- settle.lua: all or nothing ---------------------------------------------------------------------


async def snapshot(client: Redis) -> dict[bytes, tuple[bytes, bool]]:
    """Every key's serialized value and whether it has a TTL."""
    return {k: (await client.dump(k), await client.pttl(k) > 0) async for k in client.scan_iter(match="*")}


def settle_call(a: Admission, amounts: list[Any], record: list[Any] | bytes) -> dict[str, Any]:
    """The script's arguments; ``record`` a list (sent as its JSON array) or the raw argument."""
    user, rid = a.user, a.request_id
    keys = [KEYS.inflight(user), KEYS.reservations(user), KEYS.day_usage(user, a.day),
            KEYS.month_usage(user, a.month), KEYS.settled(user, rid), KEYS.ledger(user)]
    raw = record if isinstance(record, bytes) else orjson.dumps(record) if record else b""
    return {"keys": keys, "args": [rid, *amounts, 400 * 86_400, 800 * 86_400, 3 * 86_400, 1000, raw]}


@pytest.mark.parametrize(("amounts", "record"), [
    ([0, 0, 0, 2**64 - 1, 1, 0], ["request_id", "a"]),
    ([0, 0, 0, 2**63, 1, 0], ["request_id", "a"]),
    ([0, 0, 0, -1, 1, 0], ["request_id", "a"]),
    ([0, 0, 0, "1.5", 1, 0], ["request_id", "a"]),
    ([0, 0, 0, "12abc", 1, 0], ["request_id", "a"]),
    ([2**52, 2**52, 0, 5, 1, 0], ["request_id", "a"]),
    ([0, 0, 0, 5, 1, 0], ["request_id", "a", "status"]),  # a field without its value
    ([0, 0, 0, 5, 1, 0], b'["request_id", "a"'),  # not JSON
    ([0, 0, 0, 5, 1, 0], b'"request_id"'),  # not an array
    ([0, 0, 0, 5, 1, 0], ["request_id", "a", "status", 200]),  # a value that is not a string
])
async def test_settle_script_with_a_bad_argument_writes_nothing(redis_url: str, amounts: list[Any],
                                                              record: list[Any] | bytes) -> None:
    client = Redis.from_url(redis_url)
    try:
        limiter = Limiter(client, KEYS, lease_ms=LEASE)
        a = await admit(limiter, Limits(tokens_per_day=100_000, max_concurrent_requests=1), "a", T0, tokens=4160)
        before = await snapshot(client)
        with pytest.raises(ResponseError, match="settle"):
            await limiter._settle(**settle_call(a, amounts, record))
        assert await snapshot(client) == before
        # Nothing was marked settled: the retry with the upstream's usage clamped settles in full.
        assert await limiter.settle(a, SettledUsage(total_tokens=5, images=1), {"request_id": "a"}) is True
        day = await usage(client, KEYS.day_usage("alice", a.day))
        assert (day["requests"], day["total_tokens"], day["res_tokens"]) == (1, 5, 0)
        assert await client.xlen(KEYS.ledger("alice")) == 1
    finally:
        await client.aclose()


async def test_settle_script_refuses_a_sum_that_would_overflow_and_writes_nothing(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        limiter = Limiter(client, KEYS, lease_ms=LEASE)
        a = await admit(limiter, Limits(), "a", T0)
        await client.hset(KEYS.month_usage("alice", a.month), "total_tokens", 2**53 - 2)
        before = await snapshot(client)
        with pytest.raises(ResponseError, match="total_tokens would overflow"):
            await limiter._settle(**settle_call(a, [0, 0, 0, 5, 1, 0], []))
        assert await snapshot(client) == before
    finally:
        await client.aclose()


async def test_amounts_beyond_what_the_script_takes_are_refused_before_redis(limiter: Limiter) -> None:
    a = await admit(limiter, Limits(), "a", T0)
    with pytest.raises(ValueError, match="total_tokens"):
        await limiter.settle(a, SettledUsage(total_tokens=2**64 - 1))
    assert await limiter.settle(a, SettledUsage(total_tokens=2))
