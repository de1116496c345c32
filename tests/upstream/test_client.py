"""The upstream client against a real local HTTP server: key pool, headers, error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamAuthFailed, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.client import KeyPool, UpstreamClient
from tests.support.procs import free_port, local_generations_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_key_pool_round_robin_skips_resting_keys_until_their_rest_ends() -> None:
    clock = Clock()
    pool = KeyPool(("a", "b", "c"), rest_seconds=60, clock=clock)
    assert [pool.order()[0] for _ in range(4)] == [0, 1, 2, 0]
    pool.refuse(1)
    assert all(1 not in pool.order() for _ in range(3))
    clock.now += 61
    assert 1 in pool.order()


def test_key_pool_with_every_key_resting_probes_the_one_resting_least() -> None:
    clock = Clock()
    pool = KeyPool(("a", "b"), rest_seconds=60, clock=clock)
    pool.refuse(0)
    clock.now += 10
    pool.refuse(1)
    assert pool.order() == [0]


@pytest.fixture
async def upstream() -> AsyncIterator[dict[str, Any]]:
    """A real HTTP server recording what it received; behaviour set per test."""
    state: dict[str, Any] = {"seen": [], "accept": {"good"}, "delay": 0.0}

    async def handler(request: web.Request) -> web.StreamResponse:
        state["seen"].append(dict(request.headers))
        if request.headers.get("tt-api-key") not in state["accept"]:
            return web.json_response({"error": {"message": "bad key", "type": "auth", "param": None,
                                                "code": "invalid_api_key"}}, status=401)
        await asyncio.sleep(state["delay"])
        return web.json_response({"data": [], "body": (await request.read()).decode()})

    async with local_generations_server(handler) as url:
        state["url"] = url
        yield state


async def _client(url: str, keys: tuple[str, ...], **kw: Any) -> UpstreamClient:
    client = UpstreamClient(UpstreamSettings(base_url=url, api_keys=keys, **kw))
    await client.start()
    return client


async def test_sends_original_bytes_with_upstream_key_and_no_client_credentials(upstream: dict[str, Any]) -> None:
    client = await _client(upstream["url"], ("good",))
    body = b'{"prompt": "x",  "zz_unknown": [1, 2], "model": "gpt-image-1"}'
    headers = {"authorization": "Bearer sk-igw-secret", "cookie": "s=1", "openai-organization": "org",
               "openai-project": "p", "connection": "keep-alive, x-hop", "x-hop": "1",
               "content-type": "application/json", "user-agent": "OpenAI/Python 9"}
    reply = await client.send(body, headers, "rid-1")
    payload = await reply.response.json()
    reply.response.release()
    await client.close()
    seen = {k.lower(): v for k, v in upstream["seen"][0].items()}
    assert payload["body"] == body.decode()
    assert seen["tt-api-key"] == "good" and seen["x-request-id"] == "rid-1"
    for leaked in ("authorization", "cookie", "openai-organization", "openai-project", "x-hop"):
        assert leaked not in seen
    assert seen["user-agent"] == "OpenAI/Python 9"


async def test_refused_key_is_skipped_and_rested(upstream: dict[str, Any]) -> None:
    client = await _client(upstream["url"], ("bad", "good"))
    for _ in range(3):
        reply = await client.send(b"{}", {}, "r")
        assert reply.response.status == 200
        reply.response.release()
    await client.close()
    keys = [{k.lower(): v for k, v in h.items()}.get("tt-api-key") for h in upstream["seen"]]
    assert keys.count("bad") == 1 and keys.count("good") == 3


async def test_all_keys_refused_is_upstream_auth_failed_not_401(upstream: dict[str, Any]) -> None:
    client = await _client(upstream["url"], ("bad1", "bad2"))
    with pytest.raises(UpstreamAuthFailed) as info:
        await client.send(b"{}", {}, "r")
    await client.close()
    assert info.value.status == 502 and info.value.code == "upstream_auth_failed"
    assert "bad1" not in info.value.message


async def test_timeout_after_sending_is_504_without_retry(upstream: dict[str, Any]) -> None:
    upstream["delay"] = 1
    client = await _client(upstream["url"], ("good",), timeout_seconds=0.2)
    with pytest.raises(UpstreamTimeout) as info:
        await client.send(b"{}", {}, "r")
    await client.close()
    assert info.value.status == 504 and info.value.headers["x-should-retry"] == "false"


async def test_unreachable_upstream_is_502_upstream_unavailable() -> None:
    client = await _client(f"http://127.0.0.1:{free_port()}", ("good",))
    with pytest.raises(UpstreamUnavailable) as info:
        await client.send(b"{}", {}, "r")
    await client.close()
    assert info.value.status == 502 and info.value.code == "upstream_unavailable"


async def test_redirects_are_not_followed_so_the_key_stays_home(upstream: dict[str, Any]) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(upstream["url"] + "/v1/images/generations")

    async with local_generations_server(redirect) as url:
        client = await _client(url, ("good",))
        try:
            with pytest.raises(UpstreamUnavailable, match="redirect"):
                await client.send(b"{}", {}, "r")
        finally:
            await client.close()
    assert upstream["seen"] == []  # the redirect target never saw TT-API-KEY


async def test_cookies_the_upstream_sets_are_never_sent_back(upstream: dict[str, Any]) -> None:
    """One session serves every user: a cookie kept from one answer would ride on everyone's next request."""
    async def set_cookie(request: web.Request) -> web.StreamResponse:
        upstream["seen"].append(dict(request.headers))
        response = web.json_response({"data": []})
        response.set_cookie("session", "alice-secret", path="/")
        return response

    async with local_generations_server(set_cookie) as url:
        # A host name, as real upstreams have: aiohttp's default jar keeps no cookies of IP addresses.
        client = await _client(url.replace("127.0.0.1", "localhost"), ("good",))
        try:
            for _ in range(2):
                reply = await client.send(b"{}", {}, "r")
                assert reply.response.status == 200
                reply.response.release()
        finally:
            await client.close()
    assert len(upstream["seen"]) == 2
    assert all("cookie" not in {k.lower() for k in headers} for headers in upstream["seen"])
