"""``response_format: "url"`` for GPT image models with an image store (SPEC §9), end to end.

Real processes: redis-server, SeaweedFS (with an S3 identity), the fake TTAPI and the gateway;
the official SDK as the client.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai

from gateway.devtools.seaweed import SeaweedS3
from tests.support.procs import RedisServer, Service, module_fake_upstream, start_gateway
from tests.support.seaweed import S3Store

KEY = "sk-igw-test_image_urls-0123456789"
UPSTREAM_KEY = "tt-urls-key"
BODY: dict[str, Any] = {"model": "gpt-image-1", "prompt": "a lighthouse kept as a link", "quality": "low", "n": 2,
                        "fake": {"created": 1700000000}}


fake = module_fake_upstream(UPSTREAM_KEY)


def gateway_with(store_env: dict[str, str], bucket: str, fake: Service, redis: RedisServer, tmp: Path) -> Service:
    config = {"keys": [{"user": "uma", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
              "storage": {"bucket": bucket}}
    env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url, "REDIS_URL": redis.url, **store_env}
    return start_gateway(config, env, tmp=tmp)


def direct(fake: Service) -> dict[str, Any]:
    r = httpx.post(fake.url + "/v1/images/generations", json=BODY, headers={"tt-api-key": UPSTREAM_KEY})
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def test_urls_download_the_upstreams_exact_images_and_usage_is_unchanged(
        fake: Service, redis_server: RedisServer, s3_store: S3Store, tmp_path: Path) -> None:
    gw = gateway_with(s3_store.env(), s3_store.bucket, fake, redis_server, tmp_path)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
        result = client.images.generate(**{k: v for k, v in BODY.items() if k != "fake"}, response_format="url",
                                        extra_body={"fake": BODY["fake"]})
        seen = httpx.get(fake.url + "/_fake/stats").json()["recent"][-1]
    finally:
        gw.stop()
    upstream = direct(fake)
    assert "response_format" not in seen["raw"]  # GPT image models are asked for base64
    assert [d.b64_json for d in result.data] == [None, None]
    for item, original in zip(result.data, upstream["data"], strict=True):
        assert item.url is not None
        assert httpx.get(item.url).content == base64.b64decode(original["b64_json"])
        unsigned = httpx.get(item.url.split("?")[0])
        assert unsigned.status_code == 403  # objects are private: only the presigned URL opens them
    assert result.usage is not None and result.usage.model_dump(exclude_none=True) == upstream["usage"]


def test_a_stopped_store_is_a_502_and_the_usage_is_still_recorded(
        fake: Service, redis_server: RedisServer, tmp_path: Path) -> None:
    server = SeaweedS3().start()
    store = S3Store(server)
    gw = gateway_with(store.env(), store.bucket, fake, redis_server, tmp_path)
    day = f"igw:{{u:uma}}:d:{datetime.now(UTC):%Y-%m-%d}"
    before = int(redis_server.client().hget(day, "output_tokens") or 0)
    try:
        server.stop()
        r = httpx.post(gw.url + "/v1/images/generations", json={**BODY, "response_format": "url"},
                       headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    finally:
        gw.stop()
        server.cleanup()
    assert r.status_code == 502 and r.json()["error"]["code"] == "storage_unavailable"
    assert store.secret_key not in r.text and store.access_key not in r.text
    assert int(redis_server.client().hget(day, "output_tokens") or 0) == before + 2 * 272


def test_url_is_refused_for_a_stream_and_without_a_store(fake: Service, redis_server: RedisServer,
                                                         s3_store: S3Store, tmp_path: Path) -> None:
    gw = gateway_with(s3_store.env(), s3_store.bucket, fake, redis_server, tmp_path)
    try:
        r = httpx.post(gw.url + "/v1/images/generations", headers={"authorization": f"Bearer {KEY}"},
                       json={"prompt": "x", "stream": True, "response_format": "url"})
    finally:
        gw.stop()
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
