"""A worker killed with requests in flight: what it had admitted is recorded (``settled: false``,
the estimate as usage, kept on the quota) when the leases expire, by the surviving worker's sweep;
/metrics stops counting its requests as in flight."""

from __future__ import annotations

import hashlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.config import parse_settings
from gateway.metering.ledger import decode_record
from gateway.metering.pricing import estimate
from gateway.pipeline.request import validate_image_request
from gateway.redisdb.keys import RedisKeys
from tests.support.procs import Service, module_fake_upstream, start_gateway, wait_until

KEY = "sk-igw-test_sweeper-0123456789abcdef"
UPSTREAM_KEY = "tt-sweeper-key"
BODY = {"model": "gpt-image-1", "prompt": "slow", "quality": "low", "size": "1024x1024", "fake": {"hang": True}}


fake = module_fake_upstream(UPSTREAM_KEY)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` whose remote port is ``port`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[3] == "01" and cols[9] in inodes:
                count += 1
    return count


def inflight(url: str) -> float:
    """``gateway_inflight_requests`` on /metrics, summed over the workers."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('gateway_inflight_requests{route="/v1/images/generations"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def post(url: str) -> int | str:
    try:
        return httpx.post(url + "/v1/images/generations", json=BODY, headers={"authorization": f"Bearer {KEY}"},
                          timeout=60).status_code
    except httpx.TransportError as exc:  # the worker holding this request was killed
        return type(exc).__name__


def test_requests_of_a_killed_worker_are_recorded_unsettled_and_keep_their_estimate(
        fake: Service, redis_url: str, tmp_path: Path) -> None:
    settings = parse_settings({}, env={})
    one = estimate(settings.models["gpt-image-1"], validate_image_request(BODY, settings)).tokens
    config: dict[str, Any] = {
        "keys": [{"user": "erin", "plan": "default", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        "upstream": {"timeout_seconds": 3}, "limits": {"lease_slack_seconds": 2, "sweep_interval_seconds": 0.5}}
    env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}
    httpx.post(fake.url + "/_fake/reset")
    gw = start_gateway(config, env, workers=2, tmp=tmp_path)
    assert gw.proc is not None
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, gw.url) for _ in range(8)]
            wait_until(lambda: httpx.get(fake.url + "/_fake/stats").json()["requests"] == 8, "all 8 upstream")
            wait_until(lambda: inflight(gw.url) == 8, "both workers' files showing the 8 in flight")
            busiest = max(children(gw.proc.pid), key=lambda pid: connections_to(pid, fake.port))
            assert connections_to(busiest, fake.port) > 0
            os.kill(busiest, signal.SIGKILL)
            outcomes = [f.result() for f in futures]
        killed = sum(isinstance(o, str) for o in outcomes)
        assert killed > 0 and outcomes.count(504) == 8 - killed, outcomes
        db = redis.Redis.from_url(redis_url)
        keys = RedisKeys()

        def records() -> list[dict[str, Any]]:
            return [decode_record(f) for _, f in db.xrange(keys.ledger("erin"))]

        # Nobody sends anything more: the sweep writes them once their leases (3 + 2 s) have expired.
        wait_until(lambda: len(records()) == 8, "a record for each of the 8 requests")
        unsettled = [r for r in records() if not r["settled"]]
        assert len(unsettled) == killed
        for r in unsettled:
            assert (r["status"], r["total_tokens"], r["images"], r["user"]) == (0, one, 1, "erin")
        assert all(r["status"] == 504 and r["total_tokens"] == 0 for r in records() if r["settled"])
        day = {k.decode(): int(v) for k, v in
               db.hgetall(keys.day_usage("erin", datetime.now(UTC).strftime("%Y-%m-%d"))).items()}
        assert (day["requests"], day["total_tokens"], day["images"], day["res_tokens"]) == \
            (8, killed * one, killed, 0)
        assert db.zcard(keys.inflight("erin")) == 0
        # The killed worker's in-flight gauge is dropped from /metrics, not summed for ever.
        assert inflight(gw.url) == 0
    finally:
        gw.stop()


@pytest.mark.parametrize("cluster", [False, pytest.param(True, marks=pytest.mark.cluster)])
async def test_one_sweep_records_every_users_expired_leases(cluster: bool, request: pytest.FixtureRequest) -> None:
    from redis.asyncio import Redis, RedisCluster

    from gateway.config import Limits
    from gateway.limits.limiter import Limiter
    from gateway.metering.sweeper import LeaseSweeper

    if cluster:
        nodes = request.getfixturevalue("redis_cluster")
        nodes.flush()
        client: Any = RedisCluster.from_url(nodes.url)
        await client.initialize()
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    keys = RedisKeys()
    limiter = Limiter(client, keys, lease_ms=1000)
    users = [f"u{i}" for i in range(12)]
    for user in users:
        await limiter.admit(user=user, limits=Limits(), request_id="r", n=1, est_tokens=10, est_usd_micros=0,
                            now_ms=1_000, record={"request_id": "r", "user": user, "settled": "false"})
    await client.sadd(keys.users(), *users[:6])  # the other six are users of config-file keys
    sweeper = LeaseSweeper(limiter, client, keys, interval_seconds=30, static_users=users[6:])
    try:
        assert await sweeper.sweep_once(now_ms=1_999) == 0
        assert await sweeper.sweep_once(now_ms=2_000) == 12
        for user in users:
            assert [f[b"settled"] for _, f in await client.xrange(keys.ledger(user))] == [b"false"]
    finally:
        await client.aclose()
