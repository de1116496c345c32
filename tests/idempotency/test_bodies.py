"""Large stored answers in the image store (a real SeaweedFS), small ones inline in Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.errors import StorageUnavailable
from gateway.idempotency.answers import Answer
from gateway.idempotency.bodies import StoreBodies
from gateway.idempotency.store import ClaimState, IdempotencyStore
from gateway.imagestore.store import ImageStore
from gateway.metering.metrics import Metrics
from gateway.redisdb.keys import RedisKeys
from tests.support.seaweed import S3Store

T0 = 1_795_000_000_000
BIG = Answer(200, (("content-type", "application/json"),), b'{"data":[{"b64_json":"' + b"A" * 100_000 + b'"}]}')
SMALL = Answer(400, (("content-type", "application/json"),), b'{"error":{}}')


@pytest.fixture
async def image_store(s3_store: S3Store) -> AsyncIterator[ImageStore]:
    store = ImageStore(s3_store.settings(), Metrics(CollectorRegistry()))
    await store.start()
    yield store
    await store.close()


async def stored(idem: IdempotencyStore, key: str, answer: Answer) -> Any:
    await idem.claim("alice", key, "fp", "req-1", now_ms=T0, lease_ms=60_000)
    await idem.complete("alice", key, "fp", answer)
    return await idem.claim("alice", key, "fp", "req-2", now_ms=T0, lease_ms=60_000)


async def test_large_bodies_go_to_the_store_and_replay_byte_exact(redis_url: str, image_store: ImageStore) -> None:
    redis = Redis.from_url(redis_url)
    idem = IdempotencyStore(redis, RedisKeys(), ttl_seconds=600, bodies=StoreBodies(image_store))
    big, small = await stored(idem, "big", BIG), await stored(idem, "small", SMALL)
    assert big.state is ClaimState.DONE and big.answer == BIG
    assert small.answer == SMALL
    records = {k: await redis.hgetall(k) async for k in redis.scan_iter(match="igw:{u:alice}:idem:*")}
    in_redis = sorted(len(r[b"body"]) for r in records.values())
    assert in_redis == [0, len(SMALL.body)]  # the big body is only a reference in Redis
    [blob] = [r[b"blob"] for r in records.values() if r[b"blob"]]
    assert await image_store.get_blob(blob.decode()) == BIG.body
    await redis.aclose()


async def test_a_body_gone_from_the_store_is_storage_unavailable_not_a_second_run(redis_url: str,
                                                                                 image_store: ImageStore) -> None:
    redis = Redis.from_url(redis_url)
    idem = IdempotencyStore(redis, RedisKeys(), ttl_seconds=600, bodies=StoreBodies(image_store, min_bytes=1))
    await stored(idem, "k", BIG)
    [record] = [k async for k in redis.scan_iter(match="igw:{u:alice}:idem:*")]
    await redis.hset(record, "blob", "idempotency/expired-by-a-lifecycle-rule")
    with pytest.raises(StorageUnavailable):
        await idem.claim("alice", "k", "fp", "req-3", now_ms=T0, lease_ms=60_000)
    await redis.aclose()
