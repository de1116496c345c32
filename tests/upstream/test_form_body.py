"""An edit's form as the upstream reads it: every file byte for byte, sent again whole after a refused key."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import BodyPartReader, web

from gateway.config import UpstreamSettings
from gateway.upstream.client import EDITS_PATH, UpstreamClient
from gateway.upstream.form_body import FilePart, FormBody
from tests.support.procs import free_port


def spooled(field: str, filename: str, data: bytes, content_type: str = "image/png") -> FilePart:
    file = tempfile.SpooledTemporaryFile(max_size=1024)  # small: the big one really goes to disk
    file.write(data)
    return FilePart(field, filename, content_type, file, len(data))


@pytest.fixture
async def upstream() -> AsyncIterator[dict[str, Any]]:
    """A real aiohttp server parsing the multipart body of POST /v1/images/edits."""
    state: dict[str, Any] = {"seen": []}

    async def handler(request: web.Request) -> web.Response:
        parts = []
        async for part in await request.multipart():
            assert isinstance(part, BodyPartReader)
            data = await part.read()
            parts.append((part.name, part.filename, part.headers.get("Content-Type"), bytes(data)))
        state["seen"].append({"headers": dict(request.headers), "parts": parts})
        if request.headers["tt-api-key"] != "good":
            return web.json_response({"error": {"message": "no", "type": "auth", "param": None, "code": None}},
                                     status=401)
        return web.json_response({"data": []})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(EDITS_PATH, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state["url"] = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def test_files_fields_and_names_arrive_exactly_even_after_a_refused_key(upstream: dict[str, Any]) -> None:
    big = hashlib.shake_256(b"big").digest(3 * 1024 * 1024 + 7)  # spooled to disk, read in 64 KiB pieces
    small = b"\x89PNG\r\n\x1a\n" + b"\r\n--not-a-boundary\r\n" * 3
    files = [spooled("image[]", "big.png", big), spooled("image[]", 'we"ird\nname.png', small),
             spooled("mask", "m.png", small, "image/x-mask")]
    body = FormBody([("prompt", "a hat"), ("n", "2"), ("prompt_extra", "ünïcödé")], files)
    client = UpstreamClient(UpstreamSettings(base_url=upstream["url"], api_keys=("refused", "good")))
    await client.start()
    try:
        reply = await client.send(body, {"authorization": "Bearer client"}, "rid-1", path=EDITS_PATH)
        assert reply.response.status == 200
        reply.response.release()
    finally:
        await client.close()
        body.close()
    assert [seen["headers"]["tt-api-key"] for seen in upstream["seen"]] == ["refused", "good"]
    expected = [("prompt", None, None, b"a hat"), ("n", None, None, b"2"),
                ("prompt_extra", None, None, "ünïcödé".encode()),
                ("image[]", "big.png", "image/png", big), ("image[]", "we%22ird%0Aname.png", "image/png", small),
                ("mask", "m.png", "image/x-mask", small)]
    for seen in upstream["seen"]:  # the refused attempt and the retry got the same whole body
        assert seen["parts"] == expected
        assert int(seen["headers"]["Content-Length"]) == body.size
        assert "Authorization" not in seen["headers"]
