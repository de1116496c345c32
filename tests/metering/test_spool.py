"""The usage spool: a private default place, and nothing planted there is followed, hangs or gets replayed.

Real files, FIFOs and symlinks; a real redis-server and real gateway processes where a user sees the result.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.config import parse_settings
from gateway.limits.limiter import Limiter, SettledUsage
from gateway.metering.metrics import Metrics
from gateway.metering.settle_queue import SettleQueue, Spool
from gateway.metering.spool import Settlement
from tests.metering.test_ledger import KEYS, ledger_ids, make_queue, settlement
from tests.support import procs
from tests.support.procs import RedisServer

NOBODY = 65534


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and start."""
    server = RedisServer().start()
    yield server
    server.cleanup()


def test_default_spool_is_in_a_private_state_directory(tmp_path: Path) -> None:
    home = parse_settings({}, env={"HOME": str(tmp_path)}).usage.spool_path
    assert home == str(tmp_path / ".local" / "state" / "gateway" / "usage.spool")
    xdg = parse_settings({}, env={"HOME": "/nonexistent", "XDG_STATE_HOME": str(tmp_path / "st")}).usage.spool_path
    assert xdg == str(tmp_path / "st" / "gateway" / "usage.spool")
    assert parse_settings({"usage": {"spool_path": "/var/lib/gateway/u.spool"}}, env={}).usage.spool_path == \
        "/var/lib/gateway/u.spool"
    Spool(home).append([settlement("p1")])
    assert stat.S_IMODE(os.stat(Path(home).parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o600


def test_a_world_writable_directory_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(OSError, match="world-writable"):
        Spool(str(shared / "usage.spool")).append([settlement("w1")])
    assert list(shared.iterdir()) == []


async def test_a_symlink_planted_at_the_spool_is_neither_followed_nor_replayed(
        own_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere.spool"
    Spool(str(elsewhere)).append([settlement("planted")])
    before = elsewhere.read_bytes()
    path = tmp_path / "spool" / "usage.spool"
    path.parent.mkdir(mode=0o700)
    path.symlink_to(elsewhere)
    queue, _, client = make_queue(own_redis, path)
    try:
        with caplog.at_level(logging.ERROR, "gateway.settle"):
            await queue.start()
        assert not queue.pending and ledger_ids(own_redis) == []
        assert "symbolic link" in caplog.text and str(path) in caplog.text
        with pytest.raises(OSError):
            Spool(str(path)).append([settlement("x")])  # nor written through
        assert elsewhere.read_bytes() == before and path.is_symlink()
    finally:
        await queue.close()
        await client.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a file owned by another user")
async def test_another_users_file_is_reported_and_skipped_not_replayed(
        own_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.spool"
    Spool(str(path)).append([settlement("foreign")])
    os.chown(path, NOBODY, NOBODY)
    queue, _, client = make_queue(own_redis, path)
    try:
        with caplog.at_level(logging.ERROR, "gateway.settle"):
            await queue.start()
        assert not queue.pending and ledger_ids(own_redis) == []
        assert f"owned by uid {NOBODY}" in caplog.text
        assert path.exists() and path.stat().st_uid == NOBODY  # left for an operator to look at
    finally:
        await queue.close()
        await client.aclose()


async def test_an_unusable_spool_is_reported_and_counted_never_raised(
        own_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    queue, metrics, client = make_queue(own_redis, not_a_dir / "usage.spool")
    try:
        own_redis.stop()
        with caplog.at_level(logging.ERROR, "gateway.settle"):
            await queue.start()
            await queue.settle(settlement("u1"))
            await queue.close()
        assert "u1" in caplog.text and "LOST" in caplog.text and str(not_a_dir) in caplog.text
        assert metrics.registry.get_sample_value("gateway_usage_lost_settlements_total",
                                                 {"reason": "spool_error"}) == 1
    finally:
        own_redis.start()
        await client.aclose()


@pytest.mark.parametrize("plant", ["fifo", "not_a_directory"])
def test_a_gateway_starts_whatever_is_planted_at_its_spool_path(redis_url: str, tmp_path: Path, plant: str) -> None:
    spool = tmp_path / "spool" / "usage.spool"
    spool.parent.mkdir(mode=0o700)
    if plant == "fifo":
        os.mkfifo(spool)
        expected = "is not a regular file"
    else:
        spool = tmp_path / "a-file" / "usage.spool"
        spool.parent.write_text("")
        expected = "Not a directory"
    env = {"REDIS_URL": redis_url, "TTAPI_API_KEY": "tt-x", "UPSTREAM_BASE_URL": "http://127.0.0.1:9"}
    with procs.running(procs.start_gateway({"usage": {"spool_path": str(spool)}}, env, tmp=tmp_path)) as gw:
        assert httpx.get(gw.url + "/readyz").status_code == 200
        procs.wait_until(lambda: expected in gw.log(), "the spool problem reported")
        assert "Traceback" not in gw.log()


# --- REVIEW defects 1 and 3 -------------------------------------------------------------------------


async def test_a_settlement_that_cannot_be_settled_or_spooled_is_logged_and_counted_lost(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    client = Redis.from_url(redis_url)
    metrics = Metrics()
    queue = SettleQueue(Limiter(client, KEYS, lease_ms=60_000), metrics, redis=client)  # no spool
    try:
        bad = settlement("too-big", usage=SettledUsage(total_tokens=2**60))  # refused before Redis: no retry helps
        with caplog.at_level(logging.ERROR, "gateway.settle"):
            await queue.settle(bad)
        assert not queue.pending
        assert metrics.registry.get_sample_value("gateway_usage_lost_settlements_total", {"reason": "no_spool"}) == 1
        assert "too-big" in caplog.text and "LOST" in caplog.text
        assert "kept in the spool" not in caplog.text
    finally:
        await queue.close()
        await client.aclose()


class ThreadRecordingSpool(Spool):
    """A real Spool that notes which thread each append ran on."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.threads: list[int] = []

    def append(self, settlements: Any) -> int:
        self.threads.append(threading.get_ident())
        return super().append(settlements)


async def test_spool_appends_never_run_on_the_event_loop(own_redis: RedisServer, tmp_path: Path) -> None:
    queue, _, client = make_queue(own_redis)
    spool = ThreadRecordingSpool(str(tmp_path / "usage.spool"))
    queue.spool, queue.max_size = spool, 1
    loop_thread = threading.get_ident()
    try:
        own_redis.stop()
        await queue.settle(settlement("q1"))  # queued
        await queue.settle(settlement("q2"))  # queue full: spooled on the request path
        await queue.settle(settlement("bad", usage=SettledUsage(total_tokens=2**60)))  # not Redis: spooled
        await queue.close()  # q1 spooled at shutdown
        await queue.settle(settlement("late"))  # after shutdown: spooled
    finally:
        own_redis.start()
        await client.aclose()
    lines = (tmp_path / "usage.spool").read_bytes().splitlines()
    assert {Settlement.from_json(line).admission.request_id for line in lines} == {"q1", "q2", "bad", "late"}
    assert len(spool.threads) == 4 and loop_thread not in spool.threads
