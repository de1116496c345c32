"""KeyStore against a real Redis and a three-master Redis Cluster: create, lookup, list, revoke.

The clock is injected, so expired keys are made by creating them "in the past" instead of waiting.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from gateway.auth.authenticator import Authenticator
from gateway.auth.keystore import KeyStore, iso_utc
from gateway.config import Limits, key_digest, parse_settings
from gateway.errors import InvalidApiKey, InvalidRequest, MissingParameter, ServiceUnavailable
from gateway.redisdb.keys import RedisKeys
from tests.support import procs

KEYS = RedisKeys("igw:")
SETTINGS = parse_settings({
    "models": {"gpt-image-1": {}, "dall-e-3": {}, "dall-e-2": {}},
    "plans": {"default": {"requests_per_minute": 60, "images_per_minute": 30},
              "gold": {"requests_per_minute": 600, "models": ["gpt-image-1", "dall-e-3"]}},
}, env={})
NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Redis | RedisCluster]:
    """An empty Redis: the session's private server, or the module's three-master Cluster."""
    if request.param == "single":
        c: Redis | RedisCluster = Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        cluster: procs.RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        c = RedisCluster.from_url(cluster.url)
    yield c
    await c.aclose()


def store_at(client: Any, when: datetime = NOW) -> KeyStore:
    return KeyStore(client, KEYS, SETTINGS, clock=lambda: when)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def dump(client: Redis | RedisCluster) -> dict[str, Any]:
    """Every key and value in Redis (all nodes of a Cluster), decoded loosely for searching."""
    out: dict[str, Any] = {}
    async for key in client.scan_iter(match="*"):
        kind = _text(await client.type(key))
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        else:
            value = kind
        out[key.decode()] = value
    return out


async def test_create_returns_the_key_once_and_stores_only_its_digest(client: Any) -> None:
    created = await store_at(client).create({"user": "alice", "team": "art", "plan": "gold", "name": "ci",
                                             "limits": {"requests_per_minute": 5, "usd_per_month": 12.5},
                                             "models": ["gpt-image-1"], "expires_at": "2027-01-31T00:00:00Z"})
    assert re.fullmatch(r"sk-igw-[a-z0-9]{8}_[A-Za-z0-9_-]{43}", created.key)
    assert created.record.id == "key_" + created.key[len("sk-igw-"):][:8]
    assert created.as_dict() == {
        "id": created.record.id, "key": created.key, "user": "alice", "team": "art", "plan": "gold",
        "limits": {"requests_per_minute": 5, "usd_per_month": 12.5}, "models": ["gpt-image-1"], "name": "ci",
        "created_at": "2026-11-24T12:00:00Z", "expires_at": "2027-01-31T00:00:00Z", "webhook_url": None}
    contents = repr(await dump(client))
    secret = created.key.split("_", 1)[1]
    assert created.key not in contents and secret not in contents
    assert KEYS.api_key(key_digest(created.key)) in contents
    assert await store_at(client).lookup(key_digest(created.key)) == created.record


async def test_lookup_of_an_unknown_digest_is_none(client: Any) -> None:
    assert await store_at(client).lookup(key_digest("sk-igw-nope")) is None


async def test_list_shows_a_users_live_keys_oldest_first_and_revoke_removes_them(client: Any) -> None:
    first = await store_at(client, NOW).create({"user": "alice"})
    second = await store_at(client, NOW + timedelta(seconds=5)).create({"user": "alice", "name": "two"})
    await store_at(client).create({"user": "bob"})
    store = store_at(client)
    assert [r.id for r in await store.list("alice")] == [first.record.id, second.record.id]
    assert await store.list("carol") == []
    assert await store.revoke(first.record.id) is True
    assert [r.id for r in await store.list("alice")] == [second.record.id]
    revoked = await store.lookup(key_digest(first.key))
    assert revoked is not None and revoked.revoked and not revoked.usable(NOW)
    assert await store.revoke(first.record.id) is True  # revoking twice is harmless
    assert await store.revoke("key_00000000") is False
    assert await store.revoke("sk-igw-abcdefgh_pasted-key-by-mistake") is False


async def test_users_index_lists_every_user_with_a_key(client: Any) -> None:
    for user in ("alice", "bob", "alice"):
        await store_at(client).create({"user": user})
    assert await client.smembers(KEYS.users()) == {b"alice", b"bob"}


@pytest.mark.parametrize(("body", "param", "error"), [
    ({}, "user", MissingParameter),
    ({"user": None}, "user", MissingParameter),
    ({"user": ""}, "user", InvalidRequest),
    ({"user": "a b"}, "user", InvalidRequest),
    ({"user": "{x}"}, "user", InvalidRequest),
    ({"user": 7}, "user", InvalidRequest),
    ({"user": "alice", "team": "a/b"}, "team", InvalidRequest),
    ({"user": "alice", "plan": "platinum"}, "plan", InvalidRequest),
    ({"user": "alice", "limits": {"requests_per_hour": 5}}, "limits.requests_per_hour", InvalidRequest),
    ({"user": "alice", "limits": {"requests_per_minute": -1}}, "limits.requests_per_minute", InvalidRequest),
    ({"user": "alice", "limits": {"requests_per_minute": 1.5}}, "limits.requests_per_minute", InvalidRequest),
    ({"user": "alice", "limits": {"images_per_day": True}}, "limits.images_per_day", InvalidRequest),
    ({"user": "alice", "limits": [1]}, "limits", InvalidRequest),
    ({"user": "alice", "models": ["gpt-image-2"]}, "models", InvalidRequest),
    ({"user": "alice", "models": "gpt-image-1"}, "models", InvalidRequest),
    ({"user": "alice", "name": 5}, "name", InvalidRequest),
    ({"user": "alice", "name": "n" * 201}, "name", InvalidRequest),
    ({"user": "alice", "expires_at": "next week"}, "expires_at", InvalidRequest),
    ({"user": "alice", "expires_at": 1893456000}, "expires_at", InvalidRequest),
    ({"user": "alice", "expires_at": "2026-11-24T12:00:00Z"}, "expires_at", InvalidRequest),
    ({"user": "alice", "expires_at": "2026-01-01T00:00:00Z"}, "expires_at", InvalidRequest),
    ({"user": "alice", "expires_at": "9999-12-31T23:00:00-05:00"}, "expires_at", InvalidRequest),
    ({"user": "alice", "expires_at": "2027-02-30T00:00:00Z"}, "expires_at", InvalidRequest),
    ({"user": "alice", "key": "sk-igw-chosen"}, "key", InvalidRequest),
])
async def test_invalid_specs_are_refused_naming_the_field_and_write_nothing(
        client: Any, body: dict[str, Any], param: str, error: type[InvalidRequest]) -> None:
    with pytest.raises(InvalidRequest) as info:
        await store_at(client).create(body)
    assert type(info.value) is error and info.value.status == 400 and info.value.param == param
    assert await dump(client) == {}


@pytest.mark.parametrize(("given", "stored"), [
    ("2027-01-31T00:00:00Z", "2027-01-31T00:00:00Z"),
    ("2027-01-31T02:30:00+02:00", "2027-01-31T00:30:00Z"),
    ("2027-01-31T00:00:00", "2027-01-31T00:00:00Z"),
    ("2027-01-31", "2027-01-31T00:00:00Z"),
    (None, None),
])
async def test_expires_at_is_stored_as_utc(client: Any, given: str | None, stored: str | None) -> None:
    created = await store_at(client).create({"user": "alice", "expires_at": given})
    assert created.record.expires_at == stored


async def test_authenticator_refuses_expired_and_revoked_keys_and_merges_plan_and_key(client: Any) -> None:
    real_now = datetime.now(UTC)
    past = real_now - timedelta(days=1)
    expired = await store_at(client, past).create({"user": "alice",
                                                   "expires_at": iso_utc(past + timedelta(hours=1))})
    live = await store_at(client, real_now).create({
        "user": "alice", "team": "art", "plan": "gold",
        "limits": {"requests_per_minute": 5, "images_per_minute": None},
        "models": ["dall-e-3", "dall-e-2"], "expires_at": iso_utc(real_now + timedelta(hours=1))})
    clock = [0.0]
    auth = Authenticator(SETTINGS, store=store_at(client, real_now), clock=lambda: clock[0])
    with pytest.raises(InvalidApiKey):
        await auth.authenticate(f"Bearer {expired.key}")
    principal = await auth.authenticate(f"Bearer {live.key}")
    assert (principal.key_id, principal.user, principal.team, principal.plan) == (
        live.record.id, "alice", "art", "gold")
    assert principal.limits == Limits(requests_per_minute=5, images_per_minute=None)
    assert principal.models == frozenset({"dall-e-3"})  # the plan's allow-list and the key's, intersected

    assert await store_at(client).revoke(live.record.id)
    clock[0] += SETTINGS.auth.key_cache_seconds / 2  # still cached: the Redis round trip is saved
    assert (await auth.authenticate(f"Bearer {live.key}")).key_id == live.record.id
    clock[0] += SETTINGS.auth.key_cache_seconds  # cache expired: the revocation is seen
    with pytest.raises(InvalidApiKey):
        await auth.authenticate(f"Bearer {live.key}")


async def test_redis_down_is_503_not_a_crash_nor_a_401() -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{procs.free_port()}/0", socket_connect_timeout=0.5)
    try:
        store = store_at(dead)
        for call in (store.lookup(key_digest("x")), store.create({"user": "alice"}), store.list("alice"),
                     store.revoke("key_abcdefgh")):
            with pytest.raises(ServiceUnavailable):
                await call
        with pytest.raises(ServiceUnavailable):
            await Authenticator(SETTINGS, store=store).authenticate("Bearer sk-igw-whatever")
    finally:
        await dead.aclose()
