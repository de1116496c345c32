"""The Idempotency-Key scripts against a real Redis and a three-master Cluster.

Time is passed in (``now_ms``), so lease expiry is tested by moving the clock, not by waiting.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.crc import key_slot

from gateway.idempotency.answers import Answer
from gateway.idempotency.store import ClaimState, IdempotencyStore
from gateway.redisdb.keys import RedisKeys

KEYS = RedisKeys()
T0 = 1_795_000_000_000
LEASE = 60_000
BODY = b'{"created":1,"data":[{"b64_json":"\x00\xff binary-safe"}]}'
ANSWER = Answer(200, (("content-type", "application/json"),), BODY)


@pytest.fixture
def store(any_redis: Any) -> IdempotencyStore:
    return IdempotencyStore(any_redis, KEYS, ttl_seconds=3600)


async def test_the_first_claim_runs_a_repeat_waits_then_replays_the_stored_answer(store: IdempotencyStore) -> None:
    first = await store.claim("alice", "k1", "fp", "req-1", now_ms=T0, lease_ms=LEASE)
    assert first.state is ClaimState.CLAIMED
    waiting = await store.claim("alice", "k1", "fp", "req-2", now_ms=T0 + 1, lease_ms=LEASE)
    assert waiting.state is ClaimState.RUNNING and waiting.lease_deadline_ms == T0 + LEASE
    assert await store.complete("alice", "k1", "fp", ANSWER)
    done = await store.claim("alice", "k1", "fp", "req-3", now_ms=T0 + 2, lease_ms=LEASE)
    assert done.state is ClaimState.DONE and done.answer == ANSWER


async def test_another_request_under_the_same_key_is_a_mismatch_running_or_done(store: IdempotencyStore) -> None:
    await store.claim("alice", "k1", "fp-a", "req-1", now_ms=T0, lease_ms=LEASE)
    assert (await store.claim("alice", "k1", "fp-b", "req-2", now_ms=T0, lease_ms=LEASE)).state is ClaimState.MISMATCH
    await store.complete("alice", "k1", "fp-a", ANSWER)
    assert (await store.claim("alice", "k1", "fp-b", "req-3", now_ms=T0, lease_ms=LEASE)).state is ClaimState.MISMATCH
    assert not await store.complete("alice", "k1", "fp-b", ANSWER)


async def test_keys_are_per_user(store: IdempotencyStore) -> None:
    await store.claim("alice", "k1", "fp-a", "req-1", now_ms=T0, lease_ms=LEASE)
    assert (await store.claim("bob", "k1", "fp-b", "req-2", now_ms=T0, lease_ms=LEASE)).state is ClaimState.CLAIMED


async def test_a_released_claim_frees_the_key_for_any_request(store: IdempotencyStore) -> None:
    await store.claim("alice", "k1", "fp-a", "req-1", now_ms=T0, lease_ms=LEASE)
    assert not await store.release("alice", "k1", "someone-else")
    assert await store.release("alice", "k1", "req-1")
    assert (await store.claim("alice", "k1", "fp-b", "req-2", now_ms=T0, lease_ms=LEASE)).state is ClaimState.CLAIMED


async def test_a_holder_past_its_lease_is_taken_over_and_can_no_longer_release(store: IdempotencyStore) -> None:
    await store.claim("alice", "k1", "fp", "req-1", now_ms=T0, lease_ms=LEASE)
    later = T0 + LEASE + 1
    assert (await store.claim("alice", "k1", "fp", "req-2", now_ms=later, lease_ms=LEASE)).state is ClaimState.CLAIMED
    assert (await store.claim("alice", "k1", "fp", "req-3", now_ms=later, lease_ms=LEASE)).state is ClaimState.RUNNING
    assert not await store.release("alice", "k1", "req-1")
    # The first runner's late answer is still a real answer: the first stored is the one replayed.
    assert await store.complete("alice", "k1", "fp", ANSWER)
    assert not await store.complete("alice", "k1", "fp", Answer(500, ANSWER.headers, b"second"))
    assert (await store.claim("alice", "k1", "fp", "req-4", now_ms=later, lease_ms=LEASE)).answer == ANSWER


async def test_records_expire_after_the_ttl_and_live_under_the_users_hash_tag(store: IdempotencyStore,
                                                                               any_redis: Any) -> None:
    await store.claim("alice", "k" * 255, "fp", "req-1", now_ms=T0, lease_ms=LEASE)
    await store.complete("alice", "k" * 255, "fp", ANSWER)
    [record] = [k async for k in _scan(any_redis, "igw:{u:alice}:idem:*")]
    assert 3_500_000 < await any_redis.pttl(record) <= 3_600_000
    assert key_slot(record) == key_slot(KEYS.ledger("alice").encode())


async def _scan(client: Any, pattern: str) -> Any:
    async for key in client.scan_iter(match=pattern):
        yield key
