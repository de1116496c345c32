"""Bursts and a stalled Redis, through a real gateway process: queue, stay exact, shed deliberately.

Redis is "paused" with SIGSTOP: the process keeps its socket open and never answers, which
is what a hung or overloaded Redis looks like to the gateway (unlike a stopped one, whose
closed port fails fast).
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tests.pipeline.test_gateway import UPSTREAM_KEY
from tests.support.procs import RedisServer, Service, start_gateway, wait_until

KEY = "sk-igw-test_overload-aaaaaaaaaaaaaaaa"


def gateway(fake: Service, redis: RedisServer, tmp: Path, plan: dict[str, Any], **redis_cfg: Any) -> Service:
    # A 1,000-request burst needs ~2,000 descriptors in this process and the gateway (which inherits it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    cfg = {"plans": {"p": plan}, "redis": redis_cfg,
           "keys": [{"user": "dana", "plan": "p", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}
    env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis.url}
    return start_gateway(cfg, env, tmp=tmp)


async def burst(url: str, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` requests sent at once, one connection each: (status, headers, body) of each."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one() -> tuple[int, dict[str, str], bytes]:
            async with session.post(url + "/v1/images/generations", json={"prompt": "x", "quality": "low"},
                                    headers={"authorization": f"Bearer {KEY}"}) as resp:
                return resp.status, dict(resp.headers), await resp.read()

        return await asyncio.gather(*(one() for _ in range(count)))


def post(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"prompt": "x", "quality": "low"},
                      headers={"authorization": f"Bearer {KEY}"}, timeout=60)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_a_burst_of_1000_all_succeed(fake: Service, pausable_redis: RedisServer, tmp_path: Path) -> None:
    gw = gateway(fake, pausable_redis, tmp_path, {"requests_per_minute": 100_000})
    try:
        statuses = Counter(status for status, _, _ in await burst(gw.url, 1000))
        assert statuses == {200: 1000}
    finally:
        gw.stop()


async def test_a_burst_of_1000_against_300_per_minute_admits_exactly_300(
        fake: Service, pausable_redis: RedisServer, tmp_path: Path) -> None:
    gw = gateway(fake, pausable_redis, tmp_path, {"requests_per_minute": 300})
    try:
        statuses = Counter(status for status, _, _ in await burst(gw.url, 1000))
        assert statuses == {200: 300, 429: 700}
        assert int(pausable_redis.client().zcard("igw:{u:dana}:rpm")) == 300
    finally:
        gw.stop()


def test_a_paused_redis_is_reported_unavailable_then_recovers(
        fake: Service, pausable_redis: RedisServer, tmp_path: Path) -> None:
    gw = gateway(fake, pausable_redis, tmp_path, {"requests_per_minute": 1000}, health_interval_seconds=0.2,
                 health_timeout_seconds=0.5, health_failures=2)
    assert pausable_redis.proc is not None
    try:
        assert post(gw.url).status_code == 200
        pausable_redis.proc.send_signal(signal.SIGSTOP)
        # Within interval + failures * timeout (1.2 s here); the poll only bounds a broken gateway.
        wait_until(lambda: httpx.get(gw.url + "/readyz", timeout=5).status_code == 503, "readyz 503",
                   timeout=10)
        down = post(gw.url)
        assert down.status_code == 503 and down.json()["error"]["code"] == "service_unavailable"
        assert int(down.headers["retry-after"]) >= 1
        pausable_redis.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: httpx.get(gw.url + "/readyz", timeout=5).status_code == 200, "readyz 200",
                   timeout=10)
        assert post(gw.url).status_code == 200
    finally:
        gw.stop()


async def test_an_overloaded_admission_queue_sheds_with_retry_after_and_counts_it(
        fake: Service, pausable_redis: RedisServer, tmp_path: Path) -> None:
    # One pipeline, a queue of 2, and a circuit that will not open during the test: with Redis paused
    # the first pipeline hangs (with one or two admissions as they arrive, or with none when it was
    # carrying the first request's settlement), two more wait, the rest (16 to 18 of 20) are shed at once.
    gw = gateway(fake, pausable_redis, tmp_path, {"requests_per_minute": 1000}, pipeline_connections=1,
                 admission_queue=2, admission_wait_seconds=60, health_timeout_seconds=60)
    assert pausable_redis.proc is not None
    try:
        assert post(gw.url).status_code == 200  # scripts loaded, connections open
        pausable_redis.proc.send_signal(signal.SIGSTOP)
        pending = asyncio.ensure_future(burst(gw.url, 20))
        await asyncio.to_thread(wait_until, lambda: metric(gw.url, 'gateway_admission_shed_total{reason="queue_full"}')
                                >= 16, "sheds counted", 30)
        pausable_redis.proc.send_signal(signal.SIGCONT)
        results = await pending
        shed = [(h, b) for status, h, b in results if status == 503]
        assert len(shed) == metric(gw.url, 'gateway_admission_shed_total{reason="queue_full"}')
        assert 16 <= len(shed) <= 18
        assert all(int(h["Retry-After"]) >= 1 and b"service_unavailable" in b for h, b in shed)
        assert Counter(status for status, _, _ in results)[200] == 20 - len(shed)
    finally:
        gw.stop()
