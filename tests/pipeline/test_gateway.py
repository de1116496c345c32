"""Admission through real gateway processes: exact limits across workers and replicas, Redis trouble.

The Lua-level edge cases (window edges with the clock passed in, periods, leases) are in
test_limits.py; here a user's view: the OpenAI SDK or raw HTTP against running gateways.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.procs import (
    RedisCluster,
    RedisServer,
    Service,
    module_fake_upstream,
    start_gateway,
    wait_until,
)

KEY = "sk-igw-test_service-aaaaaaaaaaaaaaaa"
KEY2 = "sk-igw-test_service-bbbbbbbbbbbbbbbb"
UPSTREAM_KEY = "tt-service-key"


def config(plan: dict[str, Any], **extra: Any) -> dict[str, Any]:
    keys = [{"user": "carol", "plan": "p", "sha256": hashlib.sha256(k.encode()).hexdigest()} for k in (KEY, KEY2)]
    return {"plans": {"p": plan}, "keys": keys, **extra}


fake = module_fake_upstream(UPSTREAM_KEY)


def env(fake: Service, redis_url: str) -> dict[str, str]:
    return {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}


def post(url: str, key: str = KEY, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"prompt": "x", "quality": "low", **body},
                      headers={"authorization": f"Bearer {key}"}, timeout=60)


def burst(urls: list[str], count: int, keys: tuple[str, ...] = (KEY,), **body: Any) -> list[httpx.Response]:
    """``count`` simultaneous requests spread over ``urls`` and ``keys``."""
    start = threading.Barrier(count)

    def one(i: int) -> httpx.Response:
        start.wait()
        return post(urls[i % len(urls)], keys[i % len(keys)], **body)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def assert_exactly_admitted(responses: list[httpx.Response], admitted: int) -> None:
    codes = [r.status_code for r in responses]
    assert codes.count(200) == admitted, codes
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) == len(responses) - admitted
    for r in refused:
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # The oldest admission leaves the 60 s window within a minute of the burst.
        assert 1 <= int(r.headers["retry-after"]) <= 60 and 0 < int(r.headers["retry-after-ms"]) <= 60_000


@pytest.mark.parametrize("workers", [1, 2])
def test_fifty_simultaneous_against_five_per_minute_admit_exactly_five(
        workers: int, fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(config({"requests_per_minute": 5}), env(fake, redis_url), workers=workers, tmp=tmp_path)
    try:
        assert_exactly_admitted(burst([gw.url], 50, keys=(KEY, KEY2)), 5)
    finally:
        gw.stop()


def test_two_gateway_processes_share_one_users_limit(fake: Service, redis_url: str, tmp_path: Path) -> None:
    gws = [start_gateway(config({"requests_per_minute": 5}), env(fake, redis_url), tmp=tmp_path) for _ in range(2)]
    try:
        assert_exactly_admitted(burst([g.url for g in gws], 50, keys=(KEY, KEY2)), 5)
    finally:
        for g in gws:
            g.stop()


def test_admitted_responses_carry_ratelimit_headers(fake: Service, redis_url: str, tmp_path: Path) -> None:
    plan = {"requests_per_minute": 10, "images_per_minute": 20, "tokens_per_day": 100000}
    gw = start_gateway(config(plan), env(fake, redis_url), tmp=tmp_path)
    try:
        r = post(gw.url, n=2)
        assert r.status_code == 200
        h = r.headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("10", "9")
        assert (h["x-ratelimit-limit-images"], h["x-ratelimit-remaining-images"]) == ("20", "18")
        assert h["x-ratelimit-limit-tokens"] == "100000"
        assert h["x-ratelimit-reset-requests"].endswith("s")
    finally:
        gw.stop()


def test_images_per_minute_counts_n(fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(config({"images_per_minute": 5}), env(fake, redis_url), tmp=tmp_path)
    try:
        assert post(gw.url, n=4).status_code == 200
        refused = post(gw.url, n=2)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert post(gw.url, n=1).status_code == 200
    finally:
        gw.stop()


def test_concurrency_limit_never_lets_a_third_in(fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(config({"max_concurrent_requests": 2}), env(fake, redis_url), tmp=tmp_path)
    httpx.post(fake.url + "/_fake/reset")
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, gw.url, KEY, fake={"gate": "two-slots"}) for _ in range(2)]
            wait_until(lambda: httpx.get(fake.url + "/_fake/stats").json()["requests"] == 2, "two in flight")
            extra = [post(gw.url, KEY2) for _ in range(3)]
            assert [r.status_code for r in extra] == [429, 429, 429]
            for r in extra:
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                # A slot frees when a request finishes: retry soon, not after a minute.
                assert (r.headers["retry-after"], r.headers["retry-after-ms"]) == ("1", "1000")
            httpx.post(fake.url + "/_fake/gates/two-slots")
            assert [f.result().status_code for f in held] == [200, 200]
        assert post(gw.url).status_code == 200  # slots were released when the two finished
    finally:
        gw.stop()


def test_token_quota_reserves_before_the_call(fake: Service, redis_url: str, tmp_path: Path) -> None:
    """10 simultaneous high-quality 1024x1024 requests (4160 tokens each) against 10000 tokens/day."""
    gw = start_gateway(config({"tokens_per_day": 10000}), env(fake, redis_url), tmp=tmp_path)
    try:
        responses = burst([gw.url], 10, model="gpt-image-1", quality="high", size="1024x1024")
        ok = [r for r in responses if r.status_code == 200]
        assert len(ok) == 2
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "insufficient_quota"
                assert r.headers["x-should-retry"] == "false"
                assert "tokens_per_day" in r.json()["error"]["message"]
        assert sum(r.json()["usage"]["total_tokens"] for r in ok) <= 10000
    finally:
        gw.stop()


def test_failed_upstream_call_gives_its_reservation_back(fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(config({"tokens_per_day": 5000}), env(fake, redis_url), tmp=tmp_path)
    try:
        for _ in range(3):  # each would reserve 4160+; without release the second would be refused
            assert post(gw.url, quality="high", size="1024x1024", fake={"status": 500}).status_code == 500
        assert post(gw.url, quality="high", size="1024x1024").status_code == 200
    finally:
        gw.stop()


def test_redis_down_is_503_then_recovers_without_restart(fake: Service, tmp_path: Path) -> None:
    redis = RedisServer().start()
    gw = start_gateway(config({"requests_per_minute": 100}), env(fake, redis.url), tmp=tmp_path)
    try:
        assert post(gw.url).status_code == 200
        redis.stop()
        down = post(gw.url)
        assert down.status_code == 503 and down.json()["error"]["code"] == "service_unavailable"
        assert httpx.get(gw.url + "/readyz").status_code == 503
        redis.start()  # same port, empty: scripts must be reloaded by the gateway itself
        wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 200, "readyz after restart")
        assert post(gw.url).status_code == 200
    finally:
        gw.stop()
        redis.cleanup()


def test_redis_down_with_policy_allow_serves_unmetered(fake: Service, tmp_path: Path) -> None:
    redis = RedisServer().start()
    gw = start_gateway(config({"requests_per_minute": 1}, redis={"on_unavailable": "allow"}),
                       env(fake, redis.url), tmp=tmp_path)
    try:
        redis.stop()
        assert [post(gw.url).status_code for _ in range(3)] == [200, 200, 200]
        metrics = httpx.get(gw.url + "/metrics").text
        assert "gateway_unmetered_requests_total 3.0" in metrics
    finally:
        gw.stop()
        redis.cleanup()


@pytest.mark.cluster
def test_admission_is_exact_on_a_redis_cluster(fake: Service, redis_cluster: RedisCluster, tmp_path: Path) -> None:
    redis_cluster.flush()
    gw = start_gateway(config({"requests_per_minute": 5}, redis={"cluster": True}), env(fake, redis_cluster.url),
                       tmp=tmp_path)
    try:
        assert_exactly_admitted(burst([gw.url], 30, keys=(KEY, KEY2)), 5)
        result = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            result.images.generate(prompt="x")
    finally:
        gw.stop()


async def test_admission_whose_answer_was_lost_is_undone(redis_url: str) -> None:
    """Redis ran admit.lua but the gateway timed out reading the answer: the 503'd request must not keep
    the user's only concurrency slot."""
    import redis.asyncio as aioredis
    from redis.exceptions import TimeoutError as RedisTimeout

    from gateway.config import parse_settings
    from gateway.http.app import create_app
    from gateway.tasks import drain_background_tasks

    env = {"REDIS_URL": redis_url, "TTAPI_API_KEY": "k"}
    settings = parse_settings(config({"max_concurrent_requests": 1}), env=env)
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:
        limiter = state["gateway"].limiter
        real_admit = limiter.admit

        async def admit_then_lose_the_answer(**kw: Any) -> Any:
            await real_admit(**kw)
            raise RedisTimeout("Timeout reading from socket")

        limiter.admit = admit_then_lose_the_answer

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(with_state), base_url="http://gw") as client:
            r = await client.post("/v1/images/generations", json={"prompt": "x"},
                                  headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        await drain_background_tasks(grace_seconds=10)  # the background undo has run
        redis = aioredis.Redis.from_url(redis_url)
        assert await redis.zcard("igw:{u:carol}:inflight") == 0
        assert await redis.zcard("igw:{u:carol}:rpm") == 0
        await redis.aclose()
