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

from gateway.auth.guard import AuthGuard, address_of
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


def assert_blocked_for(response: httpx.Response, seconds: int) -> None:
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert seconds - 5 <= int(response.headers["retry-after"]) <= seconds
    assert 1 <= int(response.headers["retry-after-ms"]) <= seconds * 1000


def assert_blocked(response: httpx.Response) -> None:
    assert_blocked_for(response, 120)


async def test_an_address_that_keeps_failing_has_its_failures_refused_and_good_keys_served(
        redis_url: str) -> None:
    async with replica(settings(redis_url)) as gw:
        for i in range(ALLOWED):
            assert (await gw.models(ATTACKER, bad_key(i))).status_code == 401
        assert_blocked(await gw.models(ATTACKER, bad_key(99)))
        assert_blocked(await gw.models(ATTACKER, None))
        # A valid key is never refused, whatever its address did (NAT neighbours, admins).
        assert (await gw.models(ATTACKER, GOOD)).status_code == 200

        assert (await gw.models(NEIGHBOUR, GOOD)).status_code == 200
        assert (await gw.models(NEIGHBOUR, bad_key(1))).status_code == 401
        assert (gw.count("failed"), gw.count("blocked")) == (ALLOWED + 1, 2)

        async with gw.client(ATTACKER) as http:
            # Every authenticating route is guarded, and X-Forwarded-For is not the gateway's to trust
            # (uvicorn rewrites the client address from it for FORWARDED_ALLOW_IPS proxies only).
            response = await http.post("/v1/images/generations", json={"prompt": "x"},
                                       headers={"Authorization": "Bearer sk-igw-nope", "X-Forwarded-For": NEIGHBOUR})
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
        assert_blocked(await second.models(ATTACKER, bad_key(7)))  # counted in Redis: blocked there too
        assert (await second.models(ATTACKER, GOOD)).status_code == 200
        assert (first.count("failed"), second.count("failed"), second.count("blocked")) == (ALLOWED, 0, 1)


async def test_wrong_admin_tokens_count_apart_and_the_right_one_is_served(redis_url: str) -> None:
    async with replica(settings(redis_url)) as gw:
        async def admin(token: str) -> httpx.Response:
            async with gw.client(ATTACKER) as http:
                return await http.get("/admin/keys", params={"user": "alice"},
                                      headers={"Authorization": f"Bearer {token}"})

        for i in range(ALLOWED):
            assert (await gw.models(ATTACKER, bad_key(i))).status_code == 401
        assert_blocked(await gw.models(ATTACKER, bad_key(99)))
        # API-key failures do not count against admin tokens.
        for i in range(ALLOWED):
            assert (await admin(f"guess-{i}")).status_code == 401
        assert_blocked(await admin("guess-last"))
        response = await admin(ADMIN_TOKEN)
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
        assert await client.pttl(KEYS.auth_block(ATTACKER)) < 0
        with pytest.raises(InvalidApiKey):
            await g.guard(ATTACKER, refuse)  # the limit-th failure in one window: 401, and blocked from now
        with pytest.raises(RateLimited):
            await g.guard(ATTACKER, refuse)
        assert 0 < await client.pttl(KEYS.auth_block(ATTACKER)) <= 120_000
        assert await client.zcard(KEYS.auth_failures(ATTACKER)) == ALLOWED  # bounded, whatever the flood
    finally:
        await client.aclose()


async def test_failures_while_blocked_keep_counting_and_extend_the_block(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    clock = [1_800_000_000.0]
    g, _ = guard(client, clock)
    block = KEYS.auth_block(ATTACKER)
    try:
        for _ in range(ALLOWED):
            with pytest.raises(InvalidApiKey):
                await g.guard(ATTACKER, refuse)
        # Near the end of the block the address is still failing faster than the limit: the block
        # starts again from its last over-limit failure (PEXPIRE stands in for the 119 s passing).
        clock[0] += 50
        await client.pexpire(block, 1_000)
        for _ in range(ALLOWED):
            with pytest.raises(RateLimited):
                await g.guard(ATTACKER, refuse)
        assert await client.pttl(block) > 100_000
        # A slow trickle while blocked is refused but does not lengthen the block.
        await client.pexpire(block, 1_000)
        clock[0] += 61
        with pytest.raises(RateLimited):
            await g.guard(ATTACKER, refuse)
        assert await client.pttl(block) <= 1_000
        # Once the block is over, the next over-limit failures block again at once: the failures
        # made while blocked were counted, so the count did not start again from zero.
        await client.delete(block)
        for _ in range(ALLOWED - 2):
            with pytest.raises(InvalidApiKey):
                await g.guard(ATTACKER, refuse)
        with pytest.raises(InvalidApiKey):
            await g.guard(ATTACKER, refuse)
        with pytest.raises(RateLimited):
            await g.guard(ATTACKER, refuse)
    finally:
        await client.aclose()


@pytest.mark.parametrize(("host", "unit"), [
    ("10.1.2.3", "10.1.2.3"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("fe80::1%eth0", "fe80::/64"),
    ("", "unknown"),
    ("testclient", "testclient"),
])
def test_ipv4_is_counted_per_address_and_ipv6_per_64(host: str, unit: str) -> None:
    assert address_of(host) == unit


async def test_addresses_of_one_ipv6_64_share_a_count(redis_url: str) -> None:
    async with replica(settings(redis_url)) as gw:
        for i in range(ALLOWED):
            assert (await gw.models(f"2001:db8:0:7::{i + 1:x}", bad_key(i))).status_code == 401
        assert_blocked(await gw.models("2001:db8:0:7:ffff::1", bad_key(9)))
        assert (await gw.models("2001:db8:0:8::1", bad_key(9))).status_code == 401


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


@pytest.mark.parametrize("address", ["10.1.2.3", "2001:db8::/64", "unknown"])
def test_an_addresss_keys_share_one_cluster_slot(address: str) -> None:
    slots = {key_slot(key.encode()) for key in (KEYS.auth_failures(address), KEYS.auth_block(address),
                                                 KEYS.admin_auth_failures(address), KEYS.admin_auth_block(address))}
    assert len(slots) == 1


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


def test_a_running_gateway_serves_good_credentials_from_an_address_that_failed_60_times(
        redis_url: str, tmp_path: Any) -> None:
    config = {"auth": {"failed_attempts_per_minute": 20, "block_seconds": 300},
              "keys": [{"user": "alice", "sha256": key_digest(GOOD)}]}
    env = {"REDIS_URL": redis_url, "TTAPI_API_KEY": "tt-x", "UPSTREAM_BASE_URL": "http://127.0.0.1:9",
           "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    with procs.running(procs.start_gateway(config, env, tmp=tmp_path)) as gw, \
            httpx.Client(base_url=gw.url) as http:
        def models(key: str) -> httpx.Response:
            return http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})

        statuses = [models(bad_key(i)).status_code for i in range(60)]
        assert statuses == [401] * 20 + [429] * 40
        assert models(GOOD).status_code == 200
        admin = http.get("/admin/keys", params={"user": "alice"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.status_code == 200 and admin.json() == {"data": []}
        assert_blocked_for(models(bad_key(61)), 300)
        # Wrong admin tokens are counted apart: the key failures have not used up their allowance.
        wrong = http.get("/admin/keys", params={"user": "alice"}, headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401
