"""The brute-force guard: in-process apps (httpx ASGITransport sets the client address) on a real Redis.

Two apps on one Redis stand in for two replicas. Time only matters for the 60 s window, and the
guard takes its clock as an argument there.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth.guard import AuthGuard
from gateway.config import AuthSettings, Settings, key_digest, parse_settings
from gateway.errors import InvalidApiKey, RateLimited
from gateway.http.app import create_app
from gateway.metering.metrics import Metrics
from gateway.redisdb.keys import RedisKeys
from tests.support import procs

GOOD = "sk-igw-goodgood_" + "g" * 43
ADMIN_TOKEN = "admin-token-for-guard-tests"
ATTACKER, NEIGHBOUR = "10.0.0.1", "10.0.0.2"
ALLOWED = 3
KEYS = RedisKeys("igw:")


def settings(redis_url: str, **auth: Any) -> Settings:
    return parse_settings({
        "auth": {"failed_attempts_per_minute": ALLOWED, "block_seconds": 120, **auth},
        "keys": [{"user": "alice", "sha256": key_digest(GOOD)}],
    }, env={"REDIS_URL": redis_url, "TTAPI_API_KEY": "tt-x", "UPSTREAM_BASE_URL": "http://127.0.0.1:9",
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})


class Replica:
    """A gateway app with its lifespan running, reachable as any client address."""

    def __init__(self, app: ASGIApp, state: dict[str, Any], registry: CollectorRegistry) -> None:
        self.app, self.state, self.registry = app, state, registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = dict(self.state)  # what an ASGI server does with the lifespan's state
        await self.app(scope, receive, send)

    def client(self, address: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self, client=(address, 40000)),
                                 base_url="http://gateway")

    async def models(self, address: str, key: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        async with self.client(address) as http:
            return await http.get("/v1/models", headers=headers)

    def count(self, outcome: str) -> float:
        return self.registry.get_sample_value("gateway_auth_failures_total", {"outcome": outcome}) or 0.0


@contextlib.asynccontextmanager
async def replica(s: Settings) -> AsyncIterator[Replica]:
    registry = CollectorRegistry()
    app = create_app(s, registry=registry)
    async with app.router.lifespan_context(app) as state:
        yield Replica(app, dict(state or {}), registry)


def bad_key(i: int) -> str:
    return f"sk-igw-guess{i:04d}_" + "x" * 43


def assert_blocked(response: httpx.Response) -> None:
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["retry-after"]) <= 120
    assert 1 <= int(response.headers["retry-after-ms"]) <= 120_000


async def test_an_address_that_keeps_failing_is_refused_and_others_are_not(redis_url: str) -> None:
    async with replica(settings(redis_url)) as gw:
        for i in range(ALLOWED):
            assert (await gw.models(ATTACKER, bad_key(i))).status_code == 401
        assert_blocked(await gw.models(ATTACKER, bad_key(99)))
        assert_blocked(await gw.models(ATTACKER, None))
        # A right guess from a blocked address looks exactly like a wrong one.
        assert_blocked(await gw.models(ATTACKER, GOOD))

        assert (await gw.models(NEIGHBOUR, GOOD)).status_code == 200
        assert (await gw.models(NEIGHBOUR, bad_key(1))).status_code == 401
        assert (gw.count("failed"), gw.count("blocked")) == (ALLOWED + 1, 3)

        async with gw.client(ATTACKER) as http:
            # Every authenticating route is guarded, and X-Forwarded-For is not the gateway's to trust
            # (uvicorn rewrites the client address from it for FORWARDED_ALLOW_IPS proxies only).
            response = await http.post("/v1/images/generations", json={"prompt": "x"},
                                       headers={"Authorization": f"Bearer {GOOD}", "X-Forwarded-For": NEIGHBOUR})
        assert_blocked(response)


async def test_good_keys_write_nothing_to_redis(redis_url: str) -> None:
    async with replica(settings(redis_url)) as gw:
        for _ in range(ALLOWED * 3):
            assert (await gw.models(ATTACKER, GOOD)).status_code == 200
    client = Redis.from_url(redis_url)
    try:
        assert [k async for k in client.scan_iter(match="*")] == []
    finally:
        await client.aclose()


async def test_good_keys_are_served_while_redis_is_down(redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{procs.free_port()}/0"
    async with replica(settings(dead)) as gw:
        for _ in range(ALLOWED * 3):
            assert (await gw.models(ATTACKER, GOOD)).status_code == 200
        assert gw.count("failed") == gw.count("blocked") == 0


async def test_a_block_holds_across_replicas(redis_url: str) -> None:
    s = settings(redis_url)
    async with replica(s) as first, replica(s) as second:
        for i in range(ALLOWED):
            assert (await first.models(ATTACKER, bad_key(i))).status_code == 401
        # No Redis round trip for a good key: a replica that has seen no failure from the address yet
        # serves it (at most one such attempt per replica and block; see gateway/bruteforce.py).
        assert (await second.models(ATTACKER, GOOD)).status_code == 200
        assert_blocked(await second.models(ATTACKER, bad_key(7)))  # counted in Redis: blocked there too
        assert_blocked(await second.models(ATTACKER, GOOD))  # and now known locally
        assert (await second.models(NEIGHBOUR, GOOD)).status_code == 200
        assert (first.count("failed"), second.count("failed"), second.count("blocked")) == (ALLOWED, 0, 2)


async def test_wrong_admin_tokens_count_too(redis_url: str) -> None:
    async with replica(settings(redis_url)) as gw:
        for i in range(ALLOWED):
            async with gw.client(ATTACKER) as http:
                response = await http.get("/admin/keys", params={"user": "alice"},
                                          headers={"Authorization": f"Bearer guess-{i}"})
            assert response.status_code == 401
        async with gw.client(ATTACKER) as http:
            assert_blocked(await http.get("/admin/keys", params={"user": "alice"},
                                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}))
        async with gw.client(NEIGHBOUR) as http:
            response = await http.get("/admin/keys", params={"user": "alice"},
                                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert response.status_code == 200 and response.json() == {"data": []}


async def test_zero_turns_the_guard_off(redis_url: str) -> None:
    async with replica(settings(redis_url, failed_attempts_per_minute=0)) as gw:
        for i in range(ALLOWED * 3):
            assert (await gw.models(ATTACKER, bad_key(i))).status_code == 401
        assert (await gw.models(ATTACKER, GOOD)).status_code == 200


# --- the guard itself ---------------------------------------------------------------------------


def guard(client: Any, clock: list[float], *, allowed: int = ALLOWED) -> tuple[AuthGuard, Metrics]:
    metrics = Metrics(CollectorRegistry())
    g = AuthGuard(client, KEYS, AuthSettings(failed_attempts_per_minute=allowed, block_seconds=120), metrics,
                  clock=lambda: clock[0])
    return g, metrics


async def refuse() -> None:
    raise InvalidApiKey()


async def test_only_failures_within_a_minute_count(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    clock = [1_800_000_000.0]
    g, _ = guard(client, clock)
    try:
        for _ in range(ALLOWED - 1):
            with pytest.raises(InvalidApiKey):
                await g.guard(ATTACKER, refuse)
        clock[0] += 61  # the earlier failures leave the window
        for _ in range(ALLOWED - 1):
            with pytest.raises(InvalidApiKey):
                await g.guard(ATTACKER, refuse)
        assert g.blocked_ms(ATTACKER) is None
        with pytest.raises(InvalidApiKey):
            await g.guard(ATTACKER, refuse)  # the limit-th failure in one window: 401, and blocked from now
        with pytest.raises(RateLimited):
            await g.guard(ATTACKER, refuse)
        assert 0 < await client.pttl(KEYS.auth_block(ATTACKER)) <= 120_000
    finally:
        await client.aclose()


async def test_a_redis_error_while_counting_still_answers_401() -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{procs.free_port()}/0", socket_connect_timeout=0.5)
    g, metrics = guard(dead, [1_800_000_000.0], allowed=1)
    try:
        for _ in range(3):
            with pytest.raises(InvalidApiKey):
                await g.guard(ATTACKER, refuse)
        assert metrics.registry.get_sample_value("gateway_redis_errors_total", {"op": "auth_guard"}) == 3
        assert metrics.registry.get_sample_value("gateway_auth_failures_total", {"outcome": "failed"}) == 3
    finally:
        await dead.aclose()


@pytest.mark.parametrize("address", ["10.1.2.3", "2001:db8::1", "::ffff:10.0.0.1", "unknown"])
def test_an_addresss_keys_share_one_cluster_slot(address: str) -> None:
    assert key_slot(KEYS.auth_failures(address).encode()) == key_slot(KEYS.auth_block(address).encode())


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[procs.RedisCluster]:
    cluster = procs.RedisCluster().start()
    yield cluster
    cluster.cleanup()


@pytest.mark.cluster
async def test_the_guard_script_runs_on_a_cluster(redis_cluster: procs.RedisCluster) -> None:
    redis_cluster.flush()
    client = RedisCluster.from_url(redis_cluster.url)
    g, _ = guard(client, [1_800_000_000.0])
    try:
        for address in (ATTACKER, NEIGHBOUR, "2001:db8::7"):
            for _ in range(ALLOWED):
                with pytest.raises(InvalidApiKey):
                    await g.guard(address, refuse)
            with pytest.raises(RateLimited):
                await g.guard(address, refuse)
        fresh, _ = guard(client, [1_800_000_000.0])  # another replica learns the block from Redis
        with pytest.raises(RateLimited):
            await fresh.guard(ATTACKER, refuse)
    finally:
        await client.aclose()
