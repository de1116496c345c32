"""The app's lifespan and safety nets: shutdown keeps usage; a bug still answers in OpenAI's shape."""

from __future__ import annotations

import hashlib
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.config import parse_settings
from gateway.http.app import create_app
from tests.support.procs import start_fake_upstream, start_gateway, wait_until

KEY = "sk-igw-test_app-dddddddddddddddd"


@pytest.mark.parametrize("stream", [False, True])
def test_shutdown_mid_request_still_settles_the_usage(stream: bool, redis_url: str, tmp_path: Path) -> None:
    """SIGTERM with a 1 s grace while a 3 s image call is in flight: the call finishes and is recorded."""
    fake = start_fake_upstream("tt-app")
    cfg = {"plans": {"default": {"tokens_per_day": 100000}},
           "keys": [{"user": "erin", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}
    env = {"TTAPI_API_KEY": "tt-app", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url,
           "GATEWAY_GRACE_SECONDS": "1"}
    gw = start_gateway(cfg, env, tmp=tmp_path)
    result: dict[str, Any] = {}
    body = ({"stream": True, "partial_images": 1, "fake": {"latency": 1, "event_gap": 2}} if stream
            else {"fake": {"latency": 3}})

    def call() -> None:
        try:
            result["r"] = httpx.post(gw.url + "/v1/images/generations", timeout=30,
                                     json={"model": "gpt-image-1", "prompt": "x", "quality": "low",
                                           "size": "1024x1024", **body},
                                     headers={"authorization": f"Bearer {KEY}"})
        except httpx.HTTPError as exc:
            result["error"] = exc

    try:
        thread = threading.Thread(target=call)
        thread.start()
        wait_until(lambda: httpx.get(fake.url + "/_fake/stats").json()["requests"] == 1, "request upstream")
        gw.stop(signal.SIGTERM)  # returns once the gateway process has exited
        thread.join(30)
        assert not thread.is_alive()  # the client got an answer; it is not left hanging
        # Past the grace the client is told not to retry blindly (the call is still billed, once); a stream
        # already under way is cut.
        if stream:
            assert "error" in result, result
        else:
            assert result["r"].status_code == 503 and result["r"].headers["x-should-retry"] == "false"
            assert result["r"].json()["error"]["code"] == "service_unavailable"
        r = redis.Redis.from_url(redis_url)
        days = [k for k in r.scan_iter("igw:{u:erin}:d:*")]
        assert len(days) == 1
        day = r.hgetall(days[0])
        assert int(day[b"output_tokens"]) == 272 and int(day[b"requests"]) == 1
        assert int(day[b"res_tokens"]) == 0  # the reservation was settled, not left behind
        assert len(r.xrange("igw:{u:erin}:ledger")) == 1
    finally:
        gw.stop()
        fake.stop()


async def test_an_unexpected_error_is_an_openai_shaped_500_with_request_id() -> None:
    settings = parse_settings({"keys": [{"user": "u", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]},
                              env={"TTAPI_API_KEY": "k", "REDIS_URL": "redis://127.0.0.1:1/0"})
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:
        gw = state["gateway"]

        async def broken(request: Any) -> Any:
            raise RuntimeError("a bug")

        gw.authenticate = broken

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(with_state, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            r = await client.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "a bug" not in r.text
    assert r.headers["x-request-id"]
