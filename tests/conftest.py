"""Shared fixtures: a private redis-server (flushed per test) and helpers to start processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.procs import RedisCluster, RedisServer


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
