"""Shared fixtures: a private redis-server (flushed per test) and helpers to start processes."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio import RedisCluster as AsyncRedisCluster

from gateway.devtools.seaweed import SeaweedS3
from tests.support.procs import RedisCluster, RedisServer
from tests.support.seaweed import S3Store


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's private Redis, emptied before the test."""
    redis.Redis(port=redis_server.port).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A three-master Redis Cluster for the whole session; tests flush it themselves."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """One SeaweedFS (weed server -s3) for the session, with an S3 identity: anonymous requests are refused."""
    server = SeaweedS3().start()
    yield server
    server.cleanup()


@pytest.fixture
def s3_store(seaweed: SeaweedS3) -> S3Store:
    """The session's S3 endpoint and credentials, with a bucket name of this test's own (not yet created)."""
    return S3Store(seaweed)


@pytest.fixture
def pausable_redis() -> Iterator[RedisServer]:
    """A private redis-server the test may pause (SIGSTOP: socket open, no answer); resumed and removed after."""
    server = RedisServer().start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.cleanup()


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def any_redis(request: pytest.FixtureRequest) -> AsyncIterator[AsyncRedis | AsyncRedisCluster]:
    """An empty asyncio client: of the session's private server, or of the three-master Cluster."""
    if request.param == "single":
        client: AsyncRedis | AsyncRedisCluster = AsyncRedis.from_url(request.getfixturevalue("redis_url"))
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        client = AsyncRedisCluster.from_url(cluster.url)
        await client.initialize()  # as the app does: the slot map before the first commands
    yield client
    await client.aclose()
