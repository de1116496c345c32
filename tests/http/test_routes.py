"""End to end, as a user sees it: the official OpenAI SDK → gateway process → fake TTAPI process.

Real redis-server, real fake upstream and real gateway, each started as a process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.metering.ledger import parse_iso
from gateway.pipeline.onbehalf import upstream_idempotency_key
from tests.support.procs import (
    RedisServer,
    Service,
    free_port,
    module_fake_upstream,
    start_gateway,
    wait_until,
)

KEY = "sk-igw-test_routes-0123456789abcdef"
OTHER_KEY = "sk-igw-test_routes-other-key-xyz"
UPSTREAM_KEY = "tt-routes-key"
PNG = b"\x89PNG\r\n\x1a\n"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(**extra: Any) -> dict[str, Any]:
    return {
        "default_model": "gpt-image-1",
        "plans": {"default": {}, "narrow": {"models": ["dall-e-3"]}},
        "keys": [{"user": "alice", "team": "art", "plan": "default", "sha256": digest(KEY)},
                 {"user": "bob", "plan": "narrow", "sha256": digest(OTHER_KEY)}],
        **extra,
    }


fake = module_fake_upstream(UPSTREAM_KEY, "--refuse-key", "tt-refused")


@pytest.fixture(scope="module")
def gateway(fake: Service, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {"TTAPI_API_KEY": f"tt-refused,{UPSTREAM_KEY}", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_server.url}
    svc = start_gateway(config(), env, tmp=tmp_path_factory.mktemp("gw"))
    yield svc
    svc.stop()


@pytest.fixture
def stats(fake: Service) -> Any:
    httpx.post(fake.url + "/_fake/reset")
    return lambda: httpx.get(fake.url + "/_fake/stats").json()


def sdk(gateway: Service, key: str = KEY, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, **kw)


def test_generate_returns_decodable_image_and_usage(gateway: Service, stats: Any) -> None:
    result = sdk(gateway).images.generate(model="gpt-image-1", prompt="a red fox", size="1024x1024", quality="high")
    assert base64.b64decode(result.data[0].b64_json).startswith(PNG)
    assert result.usage is not None and result.usage.output_tokens == 4160
    assert stats()["usage"]["output_tokens"] == 4160


def test_upstream_sees_its_key_and_none_of_the_clients_credentials(gateway: Service, stats: Any) -> None:
    client = sdk(gateway, organization="org-secret", project="proj-secret",
                 default_headers={"Cookie": "session=secret"})
    client.images.generate(prompt="x", extra_body={"zz_unknown_field": {"keep": [1, 2]}})
    seen = [r for r in stats()["recent"] if r["path"] == "/v1/images/generations" and r["status"] == 200][-1]
    headers = seen["headers"]
    assert headers["tt-api-key"] == UPSTREAM_KEY
    for name in ("authorization", "cookie", "openai-organization", "openai-project"):
        assert name not in headers
    assert KEY not in str(headers)


def _forwarded(body: bytes, stats: Any, gateway: Service, content_type: str = "application/json",
               key: str = KEY, **headers: str) -> dict[str, Any]:
    r = httpx.post(gateway.url + "/v1/images/generations", content=body,
                   headers={"authorization": f"Bearer {key}", "content-type": content_type, **headers})
    assert r.status_code == 200, r.text
    return [e for e in stats()["recent"] if e["path"] == "/v1/images/generations"][-1]  # type: ignore


def test_upstream_receives_the_validated_request_as_json(gateway: Service, stats: Any) -> None:
    body = b'{"model":"gpt-image-1", "prompt":"keep my fields",   "zz": {"b": 2, "a": [1, null]}, "n": 1}'
    seen = _forwarded(body, stats, gateway, content_type="text/plain")
    assert json.loads(seen["raw"]) == json.loads(body)
    assert seen["headers"]["content-type"] == "application/json"


def test_default_model_is_set_and_nothing_else_changes(gateway: Service, stats: Any) -> None:
    seen = _forwarded(b' {"prompt":"no model",   "zz": {"b": 2, "a": 1}}', stats, gateway)
    assert json.loads(seen["raw"]) == {"model": "gpt-image-1", "prompt": "no model", "zz": {"b": 2, "a": 1}}
    seen = _forwarded(b'{"prompt":"null model","model":null}', stats, gateway)
    assert json.loads(seen["raw"])["model"] == "gpt-image-1"


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model":"dall-e-3","n":10,"prompt":"x","model":"gpt-image-1","n":1}', "model"),
    (b'{"prompt":"x","n":1,"n":1}', "n"),
    (b'{"prompt":"x","zz":{"a":1,"a":2}}', "a"),
    (b'{"prompt":"x","Model":"dall-e-3","N":10}', "Model"),
    (b'{"prompt":"x","PROMPT":"y"}', "PROMPT"),
    (b'{"prompt":"x","n":NaN}', None),
])
def test_duplicate_and_case_variant_fields_are_refused_before_the_upstream(
        gateway: Service, stats: Any, body: bytes, param: str | None) -> None:
    r = httpx.post(gateway.url + "/v1/images/generations", content=body,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_value"
    assert stats()["requests"] == 0


def test_user_and_idempotency_key_go_upstream_scoped_to_the_gateway_user(gateway: Service, stats: Any) -> None:
    alice = _forwarded(b'{"prompt":"x","user":"bob"}', stats, gateway, **{"idempotency-key": "k-1"})
    bob = _forwarded(b'{"prompt":"x","model":"dall-e-3","user":"bob"}', stats, gateway, key=OTHER_KEY,
                     **{"idempotency-key": "k-1"})
    assert json.loads(alice["raw"])["user"] != "bob" and json.loads(bob["raw"])["user"] != "bob"
    assert json.loads(alice["raw"])["user"] != json.loads(bob["raw"])["user"]
    assert alice["headers"]["idempotency-key"] != bob["headers"]["idempotency-key"]
    assert "k-1" not in (alice["headers"]["idempotency-key"], bob["headers"]["idempotency-key"])
    # Another request under the same key would be refused (422, tests/idempotency): another key here.
    again = _forwarded(b'{"prompt":"y","user":"someone-else"}', stats, gateway, **{"idempotency-key": "k-2"})
    assert json.loads(again["raw"])["user"] == json.loads(alice["raw"])["user"]  # stable per gateway user
    assert alice["headers"]["idempotency-key"] == upstream_idempotency_key("alice", "k-1")  # stable per user and key
    assert again["headers"]["idempotency-key"] == upstream_idempotency_key("alice", "k-2")


async def test_async_sdk_stream_with_partial_images(gateway: Service) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY)
    stream = await client.images.generate(model="gpt-image-1", prompt="a boat", stream=True, partial_images=2)
    kinds = [event.type async for event in stream]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    await client.close()


def test_sync_sdk_stream_completed_event_carries_usage(gateway: Service) -> None:
    events = list(sdk(gateway).images.generate(model="gpt-image-1", prompt="a boat", stream=True, partial_images=1,
                                               quality="low"))
    done = events[-1]
    assert done.type == "image_generation.completed" and done.usage.output_tokens == 272
    assert base64.b64decode(done.b64_json).startswith(PNG)


def test_stream_bytes_through_gateway_equal_the_upstreams(gateway: Service, fake: Service) -> None:
    body = {"model": "gpt-image-1", "prompt": "same bytes", "stream": True, "partial_images": 3, "n": 2,
            "fake": {"created": 1700000000}}
    direct = httpx.post(fake.url + "/v1/images/generations", json=body, headers={"tt-api-key": UPSTREAM_KEY})
    through = httpx.post(gateway.url + "/v1/images/generations", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert through.headers["content-type"].startswith("text/event-stream")
    assert direct.content.count(b"event: ") == 8
    assert through.content == direct.content


def test_first_event_arrives_while_upstream_is_still_working(gateway: Service, stats: Any) -> None:
    body = {"model": "gpt-image-1", "prompt": "slow", "stream": True, "partial_images": 1, "fake": {"event_gap": 5}}
    with httpx.stream("POST", gateway.url + "/v1/images/generations", json=body, timeout=30,
                      headers={"authorization": f"Bearer {KEY}"}) as response:
        first = next(response.iter_lines())
        assert first == "event: image_generation.partial_image"
        # The upstream has not reached its completed event yet: nothing is billed so far.
        assert stats()["usage"]["output_tokens"] == 0


def test_upstream_error_is_relayed_as_is(gateway: Service, fake: Service) -> None:
    body = {"model": "gpt-image-1", "prompt": "x", "fake": {"status": 429}}
    through = httpx.post(gateway.url + "/v1/images/generations", json=body, headers={"authorization": f"Bearer {KEY}"})
    direct = httpx.post(fake.url + "/v1/images/generations", json=body, headers={"tt-api-key": UPSTREAM_KEY})
    assert (through.status_code, through.content) == (direct.status_code, direct.content) == (429, direct.content)
    assert through.headers["content-type"] == direct.headers["content-type"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gateway, max_retries=0).images.generate(prompt="x", extra_body={"fake": {"status": 400}})
    assert info.value.status_code == 400 and info.value.code == "invalid_value"


def test_stream_cut_by_upstream_ends_with_error_event(gateway: Service) -> None:
    body = {"prompt": "cut", "stream": True, "partial_images": 3, "fake": {"cut_after": 2}}
    r = httpx.post(gateway.url + "/v1/images/generations", json=body, headers={"authorization": f"Bearer {KEY}"})
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert len(events) == 3
    assert events[-1].startswith("event: error\ndata: {\"error\"")
    assert '"code":"upstream_unavailable"' in events[-1]


def test_missing_and_unknown_keys_get_the_same_401(gateway: Service) -> None:
    url = gateway.url + "/v1/images/generations"
    missing = httpx.post(url, json={"prompt": "x"})
    unknown = httpx.post(url, json={"prompt": "x"}, headers={"authorization": "Bearer sk-igw-nope"})
    assert missing.status_code == unknown.status_code == 401
    assert missing.json() == unknown.json()
    assert missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, key="sk-igw-wrong").images.generate(prompt="x")


def test_model_not_allowed_for_key_is_403(gateway: Service, stats: Any) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(gateway, key=OTHER_KEY).images.generate(model="gpt-image-1", prompt="x")
    assert info.value.code == "model_not_allowed"
    assert stats()["requests"] == 0


def test_models_lists_the_callers_models(gateway: Service) -> None:
    assert [m.id for m in sdk(gateway).models.list()] == ["gpt-image-2", "gpt-image-1.5", "gpt-image-1",
                                                          "dall-e-2", "dall-e-3"]
    assert [m.id for m in sdk(gateway, key=OTHER_KEY).models.list()] == ["dall-e-3"]


def test_health_ready_404_and_request_ids(gateway: Service) -> None:
    assert httpx.get(gateway.url + "/healthz").status_code == 200
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200
    missing = httpx.post(gateway.url + "/v1/images/edits-nope", json={})
    assert missing.status_code == 404
    assert missing.json()["error"] == {"message": "Invalid URL (POST /v1/images/edits-nope)",
                                       "type": "invalid_request_error", "param": None, "code": None}
    ids = {r.headers.get("x-request-id") for r in (ready, missing)}
    assert None not in ids and len(ids) == 2


INVALID = [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": 5}, "prompt", "invalid_value"),
    ({"prompt": "x" * 32001}, "prompt", "invalid_value"),
    ({"prompt": "x" * 1001, "model": "dall-e-2"}, "prompt", "invalid_value"),
    ({"prompt": "x" * 4001, "model": "dall-e-3"}, "prompt", "invalid_value"),
    ({"prompt": "x", "model": "gpt-4o"}, "model", "invalid_value"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": "x", "n": 11}, "n", "invalid_value"),
    ({"prompt": "x", "n": 1.5}, "n", "invalid_value"),
    ({"prompt": "x", "n": 2, "model": "dall-e-3"}, "n", "invalid_value"),
    ({"prompt": "x", "size": "2048x2048"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "1000x1000", "model": "gpt-image-2"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "3856x1024", "model": "gpt-image-2"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "4000x1008", "model": "gpt-image-2"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "1024x1024x", "model": "gpt-image-2"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "1792x1024", "model": "dall-e-2"}, "size", "invalid_value"),
    ({"prompt": "x", "quality": "hd"}, "quality", "invalid_value"),
    ({"prompt": "x", "quality": "high", "model": "dall-e-3"}, "quality", "invalid_value"),
    ({"prompt": "x", "quality": "hd", "model": "dall-e-2"}, "quality", "invalid_value"),
    ({"prompt": "x", "stream": "yes"}, "stream", "invalid_value"),
    ({"prompt": "x", "stream": True, "model": "dall-e-3"}, "stream", "invalid_value"),
    ({"prompt": "x", "partial_images": 2}, "partial_images", "invalid_value"),
    ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images", "invalid_value"),
    ({"prompt": "x", "background": "transparent", "output_format": "jpeg"}, "background", "invalid_value"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "invalid_value"),
    ({"prompt": "x", "output_compression": 101}, "output_compression", "invalid_value"),
    ({"prompt": "x", "moderation": "none"}, "moderation", "invalid_value"),
    ({"prompt": "x", "response_format": "url"}, "response_format", "invalid_value"),
    ({"prompt": "x", "model": "dall-e-2", "response_format": "png"}, "response_format", "invalid_value"),
    ({"prompt": "x", "style": "vivid"}, "style", "invalid_value"),
    ({"prompt": "x", "model": "dall-e-3", "style": "pastel"}, "style", "invalid_value"),
    ({"prompt": "x", "model": "dall-e-2", "background": "opaque"}, "background", "invalid_value"),
]


def test_invalid_requests_are_refused_before_reaching_upstream(gateway: Service, stats: Any) -> None:
    url = gateway.url + "/v1/images/generations"
    auth = {"authorization": f"Bearer {KEY}"}
    for body, param, code in INVALID:
        r = httpx.post(url, json=body, headers=auth)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code, (body, r.json())
        assert r.json()["error"]["type"] == "invalid_request_error"
    for raw in (b"not json", b"[1, 2]", b'"prompt"'):
        r = httpx.post(url, content=raw, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", raw
    big = httpx.post(url, content=b'{"prompt": "' + b"x" * (1024 * 1024) + b'"}', headers=auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert stats()["requests"] == 0


def test_the_sdk_sees_a_400_as_bad_request(gateway: Service) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gateway).images.generate(prompt="x", n=11)
    assert info.value.param == "n"


def test_key_pool_skips_the_refused_key(fake: Service, stats: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"TTAPI_API_KEY": f"tt-refused,{UPSTREAM_KEY}", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_server.url}
    fresh = start_gateway(config(), env, tmp=tmp_path)  # a new pool: its first pick is tt-refused
    try:
        for _ in range(4):
            sdk(fresh).images.generate(prompt="pool")
    finally:
        fresh.stop()
    keys = [r["headers"].get("tt-api-key") for r in stats()["recent"]]
    assert keys.count(UPSTREAM_KEY) == 4
    assert keys.count("tt-refused") == 1  # refused once, then rested


def _oneoff_gateway(tmp_path: Path, fake_url: str, redis_url: str, **cfg: Any) -> Service:
    env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake_url, "REDIS_URL": redis_url}
    return start_gateway(config(**cfg), env, tmp=tmp_path)


def test_upstream_timeout_is_504_not_retried(fake: Service, redis_url: str, tmp_path: Path, stats: Any) -> None:
    gw = _oneoff_gateway(tmp_path, fake.url, redis_url, upstream={"timeout_seconds": 0.5})
    try:
        with pytest.raises(openai.APIStatusError) as info:
            sdk(gw).images.generate(prompt="slow", extra_body={"fake": {"hang": True}})
        assert info.value.status_code == 504 and info.value.code == "upstream_timeout"
        assert info.value.response.headers["x-should-retry"] == "false"
        assert stats()["requests"] == 1  # the SDK did not retry a request the upstream may have billed
    finally:
        gw.stop()


def test_unreachable_upstream_is_502(redis_url: str, tmp_path: Path) -> None:
    gw = _oneoff_gateway(tmp_path, f"http://127.0.0.1:{free_port()}", redis_url)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw, max_retries=0).images.generate(prompt="x")
        assert info.value.status_code == 502 and info.value.code == "upstream_unavailable"
    finally:
        gw.stop()


def test_every_upstream_key_refused_is_502_upstream_auth_failed(fake: Service, redis_url: str,
                                                                 tmp_path: Path) -> None:
    env = {"TTAPI_API_KEY": "tt-refused,tt-also-wrong", "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis_url}
    gw = start_gateway(config(), env, tmp=tmp_path)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw, max_retries=0).images.generate(prompt="x")
        assert info.value.status_code == 502 and info.value.code == "upstream_auth_failed"
        assert "tt-refused" not in gw.log() and "tt-also-wrong" not in gw.log()
    finally:
        gw.stop()


def test_readyz_is_503_with_reason_when_redis_is_down(fake: Service, tmp_path: Path) -> None:
    gw = _oneoff_gateway(tmp_path, fake.url, f"redis://127.0.0.1:{free_port()}/0")
    try:
        ready = httpx.get(gw.url + "/readyz")
        assert ready.status_code == 503 and "redis" in ready.json()["reason"]
        assert httpx.get(gw.url + "/healthz").status_code == 200
    finally:
        gw.stop()


def test_body_cut_after_a_200_is_502_not_retried(gateway: Service, stats: Any) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        sdk(gateway).images.generate(model="gpt-image-1", prompt="cut body", extra_body={"fake": {"cut_after": 100}})
    assert info.value.status_code == 502 and info.value.code == "upstream_unavailable"
    assert info.value.response.headers["x-should-retry"] == "false"
    calls = [e for e in stats()["recent"] if e["headers"].get("tt-api-key") == UPSTREAM_KEY]
    assert len(calls) == 1  # the upstream answered 200 (and billed): the SDK must not retry


def test_usage_is_settled_in_redis_when_the_sdk_call_returns(gateway: Service, redis_server: RedisServer) -> None:
    day = f"igw:{{u:alice}}:d:{datetime.now(UTC):%Y-%m-%d}"
    before = int(redis_server.client().hget(day, "output_tokens") or 0)
    sdk(gateway).images.generate(prompt="settled before the answer", quality="low", size="1024x1024")
    assert int(redis_server.client().hget(day, "output_tokens") or 0) == before + 272


def test_a_whitespace_prompt_is_a_prompt(gateway: Service, stats: Any) -> None:
    sdk(gateway).images.generate(prompt="   ", quality="low")  # SPEC: required and non-empty, nothing more
    assert stats()["requests"] == 1


def test_the_upstream_is_asked_for_unencoded_bytes(gateway: Service, stats: Any) -> None:
    seen = _forwarded(b'{"prompt":"x"}', stats, gateway, **{"accept-encoding": "gzip, br"})
    assert seen["headers"]["accept-encoding"] == "identity"


def test_record_time_and_latency_count_from_when_the_request_arrived(gateway: Service,
                                                                      redis_server: RedisServer) -> None:
    """A slow upload: the record's time is when the request arrived, before its body was sent."""
    body = b'{"prompt":"slow upload","quality":"low"}'
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
        time.sleep(0.5)  # the client's upload, not synchronisation
        body_sent_ms = time.time_ns() // 1_000_000
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    _, fields = redis_server.client().xrevrange("igw:{u:alice}:ledger", count=1)[0]
    assert fields[b"request_id"].decode() in answer.decode("latin-1")
    assert parse_iso(fields[b"time"].decode()) < body_sent_ms
    assert int(fields[b"latency_ms"]) >= 500


def test_a_client_gone_mid_upload_is_one_info_line(gateway: Service, stats: Any) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
    wait_until(lambda: "disconnected mid-upload" in gateway.log_path.read_text(), "the disconnect logged")
    log = gateway.log_path.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log
    assert stats()["requests"] == 0
