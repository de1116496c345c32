"""The relay as a client sees it: a gateway process in front of a scripted aiohttp upstream.

The upstream here misbehaves on purpose (wrong content type, events cut in the middle);
what is billed is read back from Redis, where the gateway settled it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
from aiohttp import web

from gateway.metering.ledger import decode_record
from gateway.redisdb.keys import RedisKeys
from tests.support.procs import Service, local_generations_server, start_gateway

KEY = "sk-igw-test_relay-0123456789abcdef"
USER = "alice"
USAGE = {"input_tokens": 7, "input_tokens_details": {"text_tokens": 7, "image_tokens": 0}, "output_tokens": 272,
         "total_tokens": 279}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def completed_event(b64: str = "QUJD") -> bytes:
    data = {"type": "image_generation.completed", "b64_json": b64, "usage": USAGE}
    return b"event: image_generation.completed\ndata: " + orjson.dumps(data) + b"\n\n"


class Scripted:
    """A gateway whose upstream answers with whatever ``handler`` the test sets."""

    def __init__(self, gw: Service, redis_url: str) -> None:
        self.gw = gw
        self.handler: Handler | None = None
        self.redis = redis.Redis.from_url(redis_url)

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gw.url + "/v1", api_key=KEY, max_retries=0)

    def day_usage(self) -> dict[str, int]:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        raw = self.redis.hgetall(RedisKeys().day_usage(USER, day))
        return {k.decode(): int(v) for k, v in raw.items()}

    def records(self) -> list[dict[str, Any]]:
        return [decode_record(fields) for _, fields in self.redis.xrange(RedisKeys().ledger(USER))]


@pytest.fixture
async def scripted(redis_url: str, tmp_path: Path) -> AsyncIterator[Scripted]:
    box: list[Scripted] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert box[0].handler is not None
        return await box[0].handler(request)

    async with local_generations_server(handler) as url:
        config = {"keys": [{"user": USER, "plan": "default", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}
        env = {"TTAPI_API_KEY": "tt-k", "UPSTREAM_BASE_URL": url, "REDIS_URL": redis_url}
        gw = await asyncio.to_thread(start_gateway, config, env, tmp=tmp_path)
        box.append(Scripted(gw, redis_url))
        try:
            yield box[0]
        finally:
            await asyncio.to_thread(gw.stop)


async def test_event_stream_answer_to_a_plain_request_is_502_and_billed(scripted: Scripted) -> None:
    async def sse(request: web.Request) -> web.StreamResponse:
        return web.Response(body=completed_event(), content_type="text/event-stream")

    scripted.handler = sse
    with pytest.raises(openai.InternalServerError) as info:
        await scripted.sdk().images.generate(model="gpt-image-1", prompt="x", quality="low")
    err = info.value
    assert err.status_code == 502 and err.response.headers["x-should-retry"] == "false"
    assert isinstance(err.body, dict) and err.body["code"] == "upstream_error"
    # The upstream generated (and billed) the image: so does the gateway.
    usage = scripted.day_usage()
    assert (usage["requests"], usage["total_tokens"], usage["images"], usage["res_tokens"]) == (1, 279, 1, 0)
    [record] = scripted.records()
    assert (record["status"], record["total_tokens"], record["images"]) == (502, 279, 1)


async def test_json_answer_to_a_stream_request_is_502_and_billed(scripted: Scripted) -> None:
    async def json(request: web.Request) -> web.StreamResponse:
        return web.json_response({"created": 1, "data": [{"b64_json": "QUJD"}], "usage": USAGE})

    scripted.handler = json
    with pytest.raises(openai.InternalServerError) as info:
        async for _ in await scripted.sdk().images.generate(model="gpt-image-1", prompt="x", stream=True):
            pass
    err = info.value
    assert err.status_code == 502 and err.response.headers["x-should-retry"] == "false"
    assert isinstance(err.body, dict) and err.body["code"] == "upstream_error"
    usage = scripted.day_usage()
    assert (usage["requests"], usage["total_tokens"], usage["images"]) == (1, 279, 1)


async def test_json_error_to_a_stream_request_is_relayed_as_is(scripted: Scripted) -> None:
    body = {"error": {"message": "content policy", "type": "invalid_request_error", "param": None, "code": "x"}}

    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=400)

    scripted.handler = refuse
    with pytest.raises(openai.BadRequestError) as info:
        await scripted.sdk().images.generate(model="gpt-image-1", prompt="x", stream=True)
    assert info.value.body == body["error"]
    usage = scripted.day_usage()
    assert (usage["requests"], usage["total_tokens"], usage["res_tokens"]) == (1, 0, 0)


async def test_upstream_dying_mid_event_ends_the_event_before_the_error_and_bills_whole_events(
        scripted: Scripted) -> None:
    cut = completed_event("QUJD" * 1000)[:2000]  # usage and type are in, the image is not

    async def die_mid_event(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(completed_event())
        await response.write(cut)
        assert request.transport is not None
        request.transport.close()  # no final chunk: the client reads a broken body
        return response

    scripted.handler = die_mid_event
    async with httpx.AsyncClient(base_url=scripted.gw.url, timeout=30) as client:
        r = await client.post("/v1/images/generations", headers={"authorization": f"Bearer {KEY}"},
                              json={"model": "gpt-image-1", "prompt": "x", "stream": True})
    assert r.status_code == 200
    assert r.content.startswith(completed_event() + cut + b"\n\nevent: error\ndata: ")
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[-1].startswith("event: error\ndata: {\"error\"")
    assert orjson.loads(events[-1].split("data: ", 1)[1])["error"]["code"] == "upstream_unavailable"
    # Only the whole completed event is billed, not the one cut in the middle.
    usage = scripted.day_usage()
    assert (usage["images"], usage["total_tokens"]) == (1, 279)
    [record] = scripted.records()
    assert record["incomplete"] is True and record["images"] == 1


async def test_events_with_lone_cr_line_endings_are_relayed_as_is_and_billed(scripted: Scripted) -> None:
    # SSE lets a line end with CR alone: `event:` and `data:` of one event are then on one "\n"-line.
    body = completed_event().replace(b"\n", b"\r")

    async def cr_events(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="text/event-stream")

    scripted.handler = cr_events
    async with httpx.AsyncClient(base_url=scripted.gw.url, timeout=30) as client:
        r = await client.post("/v1/images/generations", headers={"authorization": f"Bearer {KEY}"},
                              json={"model": "gpt-image-1", "prompt": "x", "stream": True})
    assert (r.status_code, r.content) == (200, body)
    usage = scripted.day_usage()
    assert (usage["images"], usage["total_tokens"]) == (1, 279)
    [record] = scripted.records()
    assert record["incomplete"] is False and record["images"] == 1
