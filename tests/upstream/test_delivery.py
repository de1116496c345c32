"""Bounded memory per response, as an operator sees it: clients that never read are dropped and the
gateway's memory comes back; an answer too large to hold is a 502 that is still billed; a stream
is settled when the upstream ends, however slowly its client reads."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
import uvloop

from gateway.config import parse_settings
from gateway.metering.pricing import estimate
from gateway.pipeline.request import validate_image_request
from gateway.redisdb.keys import RedisKeys
from gateway.upstream.delivery import ClientLink
from tests.support.procs import Service, module_fake_upstream, start_gateway, wait_until

KEY = "sk-igw-test_delivery-0123456789abcdef"
UPSTREAM_KEY = "tt-delivery-key"
MIB = 1024 * 1024
TCP_ESTABLISHED = 1


def config(**extra: Any) -> dict[str, Any]:
    return {"keys": [{"user": "dora", "plan": "default", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
            **extra}


fake = module_fake_upstream(UPSTREAM_KEY)


def env(fake: Service, redis_url: str) -> dict[str, str]:
    return {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stalled_client(gw: Service, body: dict[str, Any], headers: str = "") -> socket.socket:
    """A client that sends its request (``headers``: extra header lines) and then never reads (a receive buffer
    of a few KiB)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    payload = orjson.dumps(body)
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{headers}\r\n").encode()
    sock.sendall(head + payload)
    return sock


def connected(sock: socket.socket) -> bool:
    """The TCP connection is still established (read without consuming anything: TCP_INFO's state)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED


def test_clients_that_never_read_are_dropped_and_memory_comes_back(
        fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(config(server={"send_timeout_seconds": 1}), env(fake, redis_url), tmp=tmp_path)
    assert gw.proc is not None
    body = {"prompt": "big", "n": 10, "quality": "low", "fake": {"pad_bytes": int(1.5 * MIB)}}
    socks: list[socket.socket] = []
    try:
        # One answer of the same size read in full first: imports, pools and caches are warm.
        r = httpx.post(gw.url + "/v1/images/generations", json=body, headers={"authorization": f"Bearer {KEY}"},
                       timeout=60)
        assert r.status_code == 200 and len(r.content) > 10 * 2 * MIB
        start = rss_bytes(gw.proc.pid)
        socks = [stalled_client(gw, body) for _ in range(6)]
        wait_until(lambda: rss_bytes(gw.proc.pid) > start + 60 * MIB, "answers held for the stalled clients")
        # Dropped after the send timeout: the connection is reset, what they never read is discarded.
        wait_until(lambda: not any(connected(s) for s in socks), "stalled clients dropped", timeout=60)
        wait_until(lambda: rss_bytes(gw.proc.pid) < start + 20 * MIB, "memory back near its start", timeout=60)
        # The gateway still serves.
        assert httpx.post(gw.url + "/v1/images/generations", json={"prompt": "x", "quality": "low"},
                          headers={"authorization": f"Bearer {KEY}"}, timeout=60).status_code == 200
    finally:
        for s in socks:
            s.close()
        gw.stop()


def test_replays_to_clients_that_never_read_are_dropped(fake: Service, redis_url: str, tmp_path: Path) -> None:
    # An Idempotency-Key's stored answer goes out under the same send timeout as any answer (SPEC §3).
    gw = start_gateway(config(server={"send_timeout_seconds": 1}), env(fake, redis_url), tmp=tmp_path)
    body = {"prompt": "big", "n": 4, "quality": "low", "fake": {"pad_bytes": MIB}}
    auth = {"authorization": f"Bearer {KEY}", "idempotency-key": "stalled-replays"}
    socks: list[socket.socket] = []
    try:
        first = httpx.post(gw.url + "/v1/images/generations", json=body, headers=auth, timeout=60)
        assert first.status_code == 200 and len(first.content) > 4 * MIB
        socks = [stalled_client(gw, body, "Idempotency-Key: stalled-replays\r\n") for _ in range(3)]
        wait_until(lambda: 'gateway_idempotent_replays_total{route="/v1/images/generations"} 3.0'
                   in httpx.get(gw.url + "/metrics").text, "the three replays under way")
        wait_until(lambda: not any(connected(s) for s in socks), "stalled replays dropped", timeout=60)
        again = httpx.post(gw.url + "/v1/images/generations", json=body, headers=auth, timeout=60)
        assert again.headers["idempotent-replayed"] == "true" and again.content == first.content
    finally:
        for s in socks:
            s.close()
        gw.stop()


def test_answer_over_max_response_bytes_is_502_and_still_billed(
        fake: Service, redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway(config(upstream={"max_response_bytes": MIB}), env(fake, redis_url), tmp=tmp_path)
    httpx.post(fake.url + "/_fake/reset")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.images.generate(prompt="big", n=2, quality="low", extra_body={"fake": {"pad_bytes": MIB}})
        err = info.value
        assert err.status_code == 502 and err.response.headers["x-should-retry"] == "false"
        assert isinstance(err.body, dict) and err.body["code"] == "upstream_error"
        assert "upstream.max_response_bytes" in err.body["message"]
        # The upstream generated and billed both images: the gateway bills them too.
        billed = httpx.get(fake.url + "/_fake/stats").json()["usage"]
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        usage = redis.Redis.from_url(redis_url).hgetall(RedisKeys().day_usage("dora", day))
        assert (int(usage[b"images"]), int(usage[b"total_tokens"])) == (2, billed["total_tokens"])
        assert billed["total_tokens"] > 0
        assert client.images.generate(prompt="small", quality="low").data
    finally:
        gw.stop()


def test_a_stalled_stream_reader_is_settled_when_the_upstream_ends(
        fake: Service, redis_url: str, tmp_path: Path) -> None:
    body = {"model": "gpt-image-1", "prompt": "stall", "stream": True, "partial_images": 3, "quality": "low",
            "size": "1024x1024", "fake": {"pad_bytes": 2 * MIB}}
    settings = parse_settings({}, env={})
    one = estimate(settings.models["gpt-image-1"], validate_image_request(body, settings)).tokens
    # One request fits the day, two do not; leases last 3 s (upstream timeout 3 s, no slack).
    cfg = config(plans={"default": {"tokens_per_day": one * 3 // 2}}, upstream={"timeout_seconds": 3},
                 limits={"lease_slack_seconds": 0}, server={"send_timeout_seconds": 8})
    gw = start_gateway(cfg, env(fake, redis_url), tmp=tmp_path)
    day = RedisKeys().day_usage("dora", datetime.now(UTC).strftime("%Y-%m-%d"))
    db = redis.Redis.from_url(redis_url)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    sock = stalled_client(gw, body)  # ~11 MB of events; it takes a few KiB and stops
    try:
        wait_until(lambda: int(db.hget(day, "total_tokens") or 0) > 0, "usage settled")
        assert connected(sock)  # settled while the client still has not read the stream
        assert int(db.hget(day, "res_tokens") or 0) == 0
        with pytest.raises(openai.RateLimitError) as info:
            client.images.generate(model="gpt-image-1", prompt="x", quality="low", size="1024x1024")
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "insufficient_quota"
        # Dropped after the send timeout, well past its lease: the quota still holds what it used.
        wait_until(lambda: not connected(sock), "stalled client dropped")
        with pytest.raises(openai.RateLimitError):
            client.images.generate(model="gpt-image-1", prompt="x", quality="low", size="1024x1024")
        assert int(db.hget(day, "requests") or 0) == 1
    finally:
        sock.close()
        gw.stop()


def test_a_stream_client_too_far_behind_is_dropped_before_its_send_timeout(
        fake: Service, redis_url: str, tmp_path: Path) -> None:
    # The backlog a stream may hold for its client is upstream.max_response_bytes (here 1 MiB).
    cfg = config(upstream={"max_response_bytes": MIB}, server={"send_timeout_seconds": 600})
    gw = start_gateway(cfg, env(fake, redis_url), tmp=tmp_path)
    assert gw.proc is not None
    body = {"prompt": "behind", "stream": True, "partial_images": 3, "quality": "low",
            "fake": {"pad_bytes": 2 * MIB}}
    sock = stalled_client(gw, body)
    try:
        wait_until(lambda: not connected(sock), "client dropped for its backlog, long before 600 s")
        day = RedisKeys().day_usage("dora", datetime.now(UTC).strftime("%Y-%m-%d"))
        wait_until(lambda: int(redis.Redis.from_url(redis_url).hget(day, "images") or 0) == 1, "stream settled")
    finally:
        sock.close()
        gw.stop()


# ClientLink's deadline under a server that gives no transport to abort (not uvicorn): the watchdog ends
# the waiting send itself. Under uvicorn, the tests above: the dropped connection ends it.

async def never_receives() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_send_the_server_never_takes_is_ended_at_the_deadline() -> None:
    async def stuck_send(message: dict[str, Any]) -> None:
        await asyncio.Event().wait()  # the client's window stays shut

    link = ClientLink(stuck_send, never_receives, 0.05, watch=False)
    assert await link.send({"type": "http.response.start", "status": 200, "headers": []}) is False
    assert link.gone and link.dropped
    assert await link.send({"type": "http.response.body", "body": b"x"}) is False  # nothing more is sent
    await link.close()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the watchdog's cancellation was taken back


async def test_many_quick_sends_outlasting_the_deadline_all_go_through() -> None:
    sent: list[bytes] = []

    async def slowish_send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0.02)  # each send waits a little; all of them together far longer than 0.3 s
        sent.append(message["body"])

    link = ClientLink(slowish_send, never_receives, 0.3, watch=False)
    results = [await link.send({"type": "http.response.body", "body": bytes([i])}) for i in range(25)]
    await link.close()
    assert all(results) and not link.gone and len(sent) == 25


async def test_the_requests_own_cancellation_is_not_swallowed() -> None:
    started = asyncio.Event()

    async def stuck_send(message: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    async def respond() -> bool:
        link = ClientLink(stuck_send, never_receives, 30, watch=False)
        try:
            return await link.send({"type": "http.response.start", "status": 200, "headers": []})
        finally:
            await link.close()

    task = asyncio.ensure_future(respond())
    await started.wait()
    task.cancel()  # the request is cancelled (its client went, shutdown): not a deadline
    with pytest.raises(asyncio.CancelledError):
        await task


async def disconnected() -> dict[str, Any]:
    return {"type": "http.disconnect"}  # the server has seen the dropped client go: close() waits for nothing


class CountedWakes(ClientLink):
    """A ClientLink that counts its watchdog's wakes."""

    wakes = 0

    def _check(self) -> None:
        self.wakes += 1
        super()._check()


def test_the_watchdog_wakes_once_at_a_deadline_under_uvloop() -> None:
    # uvloop's clock and timers count whole milliseconds: a wake a hair before the deadline (rounding) must
    # not re-arm the watchdog for "now", again and again until the clock ticks (hundreds of wakes a send).
    async def stuck_send(message: dict[str, Any]) -> None:
        await asyncio.Event().wait()

    async def one(deadline: float) -> int:
        link = CountedWakes(stuck_send, disconnected, deadline, watch=False)
        assert await link.send({"type": "http.response.body", "body": b"x"}) is False
        await link.close()
        return link.wakes

    async def many() -> list[int]:
        # Deadlines of every sub-millisecond phase: untuned, four in ten of them spun.
        return await asyncio.gather(*(one(0.05 + i * 0.0071) for i in range(40)))

    wakes = uvloop.run(many())
    assert max(wakes) <= 3, wakes


async def test_a_deadline_cancellation_the_server_turns_into_oserror_is_taken_back() -> None:
    # An ASGI 2.4 server may answer the cancelled send as a gone client (OSError): the watchdog's
    # cancellation must not stay counted on the request's task.
    async def stuck_send(message: dict[str, Any]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise OSError("connection closed") from None

    link = ClientLink(stuck_send, disconnected, 0.05, watch=False)
    assert await link.send({"type": "http.response.body", "body": b"x"}) is False
    await link.close()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # and nothing is pending
