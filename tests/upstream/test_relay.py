"""The relay against a real local HTTP upstream: bodies read whole, errors in OpenAI's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gateway.auth.authenticator import Principal
from gateway.config import Limits, UpstreamSettings, parse_settings
from gateway.errors import UpstreamError
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.request import validate_image_request
from gateway.upstream.client import UpstreamClient
from gateway.upstream.relay import read_json_reply
from tests.support.procs import local_generations_server


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    answer: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=answer["status"], body=answer["body"], content_type=answer["type"])

    async with local_generations_server(handler) as url:
        yield url, answer


def _exchange() -> Exchange:
    settings = parse_settings({}, env={})
    principal = Principal("k", "u", None, "default", Limits(), None)
    return Exchange("rid", principal, validate_image_request({"prompt": "x"}, settings))


async def _relay(url: str) -> tuple[Exchange, list[bytes] | UpstreamError]:
    client = UpstreamClient(UpstreamSettings(base_url=url, api_keys=("k",)))
    await client.start()
    exchange = _exchange()
    try:
        reply = await client.send(b"{}", {}, "rid")
        try:
            return exchange, await read_json_reply(exchange, reply, 5)
        except UpstreamError as err:
            return exchange, err
    finally:
        await client.close()


async def test_openai_shaped_upstream_error_is_relayed_as_is(upstream: tuple[str, dict[str, Any]]) -> None:
    url, answer = upstream
    body = b'{"error": {"message": "content policy", "type": "invalid_request_error", "param": null, "code": "x"}}'
    answer.update(status=400, body=body, type="application/json")
    exchange, chunks = await _relay(url)
    assert isinstance(chunks, list) and b"".join(chunks) == body
    assert exchange.usage.total_tokens == 0


async def test_non_openai_error_body_becomes_openai_shaped_with_the_same_status(
        upstream: tuple[str, dict[str, Any]]) -> None:
    url, answer = upstream
    answer.update(status=502, body=b"<html><body>Bad Gateway</body></html>", type="text/html")
    _, err = await _relay(url)
    assert isinstance(err, UpstreamError) and err.status == 502 and err.code == "upstream_error"
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


async def test_success_body_usage_is_read_without_changing_bytes(upstream: tuple[str, dict[str, Any]]) -> None:
    url, answer = upstream
    body = (b'{"created": 1, "data": [{"b64_json": "' + b"Q" * 3_000_000 + b'"}], "usage": {"input_tokens": 3, '
            b'"input_tokens_details": {"text_tokens": 3, "image_tokens": 0}, "output_tokens": 272, '
            b'"total_tokens": 275}}')
    answer.update(status=200, body=body, type="application/json")
    exchange, chunks = await _relay(url)
    assert isinstance(chunks, list) and b"".join(chunks) == body
    assert (exchange.usage.images, exchange.usage.output_tokens, exchange.usage.total_tokens) == (1, 272, 275)
