"""The admin API as an operator and a user see it: gateway processes, real Redis, fake TTAPI.

httpx drives /admin; the official OpenAI SDK uses the keys it creates. Two gateway processes
share one Redis, standing in for two replicas.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
import redis
from redis.asyncio import Redis

from gateway.auth.keystore import KeyStore, iso_utc
from gateway.config import key_digest, parse_settings
from gateway.redisdb.keys import RedisKeys
from tests.support.procs import RedisServer, Service, module_fake_upstream, start_gateway
from tests.support.redisdump import redis_contents as contents_of

ADMIN_TOKEN = "adm-" + secrets.token_urlsafe(24)
UPSTREAM_KEY = "tt-admin-tests"
REVOCATION_SECONDS = 5.0  # SPEC §6: every replica refuses a revoked key within 5 s
CONFIG: dict[str, Any] = {
    "default_model": "gpt-image-1",
    "plans": {"default": {"requests_per_minute": 100}, "gold": {"requests_per_minute": 1000}},
    # These tests fail authentication on purpose; the brute-force guard has its own tests.
    "auth": {"failed_attempts_per_minute": 10_000},
}
KEY_FIELDS = {"id", "key", "user", "team", "plan", "limits", "models", "name", "created_at", "expires_at",
              "webhook_url"}
PNG = b"\x89PNG\r\n\x1a\n"


def env(redis_url: str, upstream: str, admin_token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"GATEWAY_ADMIN_TOKEN": admin_token, "REDIS_URL": redis_url, "TTAPI_API_KEY": UPSTREAM_KEY,
            "UPSTREAM_BASE_URL": upstream}


fake = module_fake_upstream(UPSTREAM_KEY)


@pytest.fixture(scope="module")
def replicas(fake: Service, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    tmp = tmp_path_factory.mktemp("gw")
    first = start_gateway(CONFIG, env(redis_server.url, fake.url), tmp=tmp)
    try:
        second = start_gateway(CONFIG, env(redis_server.url, fake.url), tmp=tmp)
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()
    for svc in (first, second):
        assert ADMIN_TOKEN not in svc.log()


@pytest.fixture(scope="module")
def no_admin(fake: Service, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_gateway(CONFIG, env(redis_server.url, fake.url, admin_token=""),
                        tmp=tmp_path_factory.mktemp("gw"))
    yield svc
    svc.stop()


def admin(gw: Service, token: str | None = ADMIN_TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(base_url=gw.url, headers=headers, timeout=10)


def create(gw: Service, body: dict[str, Any]) -> dict[str, Any]:
    with admin(gw) as http:
        response = http.post("/admin/keys", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def models_call(gw: Service, key: str) -> httpx.Response:
    return httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def sdk(gw: Service, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_contents(url: str) -> str:
    return contents_of(redis.Redis.from_url(url))


def key_data(url: str) -> list[bytes]:
    """Redis keys other than the brute-force guard's counters (``{a:<address>}``)."""
    return [k for k in redis.Redis.from_url(url).scan_iter(match="*") if b"{a:" not in k]


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


# --- access ------------------------------------------------------------------------------------------


ROUTES = [("POST", "/admin/keys"), ("GET", "/admin/keys?user=alice"), ("DELETE", "/admin/keys/key_abcdefgh")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("token", [None, "", "wrong-token", ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x"],
                         ids=["missing", "empty", "wrong", "prefix", "longer"])
def test_admin_routes_need_the_admin_token(replicas: tuple[Service, Service], redis_url: str, method: str,
                                          path: str, token: str | None) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}".strip()}
    response = httpx.request(method, replicas[0].url + path, headers=headers,
                             json={"user": "alice"} if method == "POST" else None)
    assert response.status_code == 401
    err = error_of(response)
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert ADMIN_TOKEN not in response.text and (not token or token not in response.text)
    assert key_data(redis_url) == []


def test_admin_token_in_another_scheme_is_refused(replicas: tuple[Service, Service]) -> None:
    for header in (f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, f"Token {ADMIN_TOKEN}"):
        response = httpx.get(replicas[0].url + "/admin/keys?user=alice", headers={"Authorization": header})
        assert response.status_code == 401


@pytest.mark.parametrize(("method", "path"), [*ROUTES, ("PUT", "/admin/keys"), ("GET", "/admin/nothing")])
@pytest.mark.parametrize("token", [None, ADMIN_TOKEN], ids=["no-token", "token"])
def test_without_gateway_admin_token_every_admin_route_is_a_plain_404(no_admin: Service, redis_url: str,
                                                                     method: str, path: str,
                                                                     token: str | None) -> None:
    with admin(no_admin, token) as http:
        response = http.request(method, path, json={"user": "alice"} if method == "POST" else None)
    assert response.status_code == 404
    assert response.json() == {"error": {"message": f"Invalid URL ({method} {path.split('?')[0]})",
                                         "type": "invalid_request_error", "param": None, "code": None}}
    assert key_data(redis_url) == []


# --- the life of a key -------------------------------------------------------------------------------


def test_created_key_works_is_listed_without_secret_and_revocation_reaches_another_replica(
        replicas: tuple[Service, Service], redis_url: str) -> None:
    first, second = replicas
    expires = iso_utc(datetime.now(UTC) + timedelta(days=30))
    created = create(first, {"user": "alice", "team": "art", "plan": "gold", "name": "ci bot",
                             "limits": {"requests_per_minute": 50}, "models": ["gpt-image-1", "dall-e-3"],
                             "expires_at": expires})
    assert set(created) == KEY_FIELDS
    assert created["key"].startswith("sk-igw-") and created["id"].startswith("key_")
    assert {k: created[k] for k in ("user", "team", "plan", "limits", "models", "name", "expires_at")} == {
        "user": "alice", "team": "art", "plan": "gold", "limits": {"requests_per_minute": 50},
        "models": ["gpt-image-1", "dall-e-3"], "name": "ci bot", "expires_at": expires}
    key = created["key"]

    # The key works at the other replica, through the official SDK.
    client = sdk(second, key)
    assert sorted(m.id for m in client.models.list()) == ["dall-e-3", "gpt-image-1"]
    image = client.images.generate(model="gpt-image-1", prompt="a lighthouse", size="1024x1024")
    assert image.data and base64.b64decode(image.data[0].b64_json or "").startswith(PNG)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.images.generate(model="dall-e-2", prompt="a lighthouse")
    assert denied.value.code == "model_not_allowed"

    with admin(first) as http:
        listed = http.get("/admin/keys", params={"user": "alice"}).json()
        assert listed == {"data": [{k: v for k, v in created.items() if k != "key"}]}
        assert key not in str(listed) and key_digest(key) not in str(listed)
        assert http.get("/admin/keys", params={"user": "bob"}).json() == {"data": []}

        revoked = http.delete(f"/admin/keys/{created['id']}")
        revoked_at = time.monotonic()
        assert revoked.status_code == 204 and revoked.content == b""
        assert http.get("/admin/keys", params={"user": "alice"}).json() == {"data": []}
        assert http.delete(f"/admin/keys/{created['id']}").status_code == 204  # again: harmless

    unknown = models_call(second, "sk-igw-unknown0_" + secrets.token_urlsafe(32))
    assert unknown.status_code == 401
    # The second replica had the key cached; it must drop it within the revocation deadline.
    while True:
        refused = models_call(second, key)
        if refused.status_code == 401 or time.monotonic() - revoked_at > REVOCATION_SECONDS:
            break
    assert refused.status_code == 401, "revoked key still accepted after 5 s"
    assert refused.json() == unknown.json()
    assert models_call(first, key).json() == unknown.json()
    with pytest.raises(openai.AuthenticationError):
        sdk(second, key).images.generate(model="gpt-image-1", prompt="x")
    for gw in replicas:
        assert key not in gw.log() and key.split("_", 1)[1] not in gw.log()


def test_revoking_an_unknown_id_is_a_404_that_does_not_echo_it(replicas: tuple[Service, Service]) -> None:
    pasted = "sk-igw-abcdefgh_" + secrets.token_urlsafe(32)
    with admin(replicas[0]) as http:
        for key_id in ("key_00000000", pasted):
            response = http.delete(f"/admin/keys/{key_id}")
            assert response.status_code == 404
            assert error_of(response)["param"] == "id" and pasted not in response.text


def test_expired_key_is_refused_like_an_unknown_one(replicas: tuple[Service, Service],
                                                    redis_url: str) -> None:
    past = datetime.now(UTC) - timedelta(days=2)

    async def make_expired_key() -> str:
        client = Redis.from_url(redis_url)
        try:
            store = KeyStore(client, RedisKeys(), parse_settings(CONFIG, env={}), clock=lambda: past)
            created = await store.create({"user": "alice", "expires_at": iso_utc(past + timedelta(hours=1))})
        finally:
            await client.aclose()
        return created.key

    key = asyncio.run(make_expired_key())
    expired = models_call(replicas[0], key)
    unknown = models_call(replicas[0], "sk-igw-unknown0_" + secrets.token_urlsafe(32))
    assert expired.status_code == unknown.status_code == 401
    assert expired.json() == unknown.json()
    assert error_of(expired)["code"] == "invalid_api_key"
    with admin(replicas[0]) as http:  # still listed: an operator sees when it expired
        assert [k["id"] for k in http.get("/admin/keys", params={"user": "alice"}).json()["data"]] == [
            "key_" + key[len("sk-igw-"):][:8]]


def test_redis_holds_the_digest_never_the_key(replicas: tuple[Service, Service], redis_url: str) -> None:
    keys = [create(replicas[0], {"user": user})["key"] for user in ("alice", "bob")]
    for key in keys:
        assert models_call(replicas[1], key).status_code == 200
    contents = redis_contents(redis_url)
    for key in keys:
        assert key not in contents and key.split("_", 1)[1] not in contents
        assert key_digest(key) in contents
    assert ADMIN_TOKEN not in contents


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "code"), [
    ({}, "user", "missing_required_parameter"),
    ({"user": "al ice"}, "user", "invalid_value"),
    ({"user": "carol\n"}, "user", "invalid_value"),
    ({"user": "alice", "team": "art\n"}, "team", "invalid_value"),
    ({"user": "alice", "name": "\u001b[2Jcleared"}, "name", "invalid_value"),
    ({"user": "alice", "limits": {"usd_per_month": 1e308}}, "limits.usd_per_month", "invalid_value"),
    ({"user": "alice", "limits": {"tokens_per_day": 10**12}}, "limits.tokens_per_day", "invalid_value"),
    ({"user": "alice", "limits": {"images_per_day": 10**30}}, "limits.images_per_day", "invalid_value"),
    ({"user": "alice", "team": ""}, "team", "invalid_value"),
    ({"user": "alice", "plan": "platinum"}, "plan", "invalid_value"),
    ({"user": "alice", "limits": {"requests_per_minute": "1"}}, "limits.requests_per_minute",
     "invalid_value"),
    ({"user": "alice", "limits": {"tokens_per_week": 1}}, "limits.tokens_per_week", "invalid_value"),
    ({"user": "alice", "models": ["midjourney"]}, "models", "invalid_value"),
    ({"user": "alice", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at", "invalid_value"),
    ({"user": "alice", "expires_at": "soon"}, "expires_at", "invalid_value"),
    ({"user": "alice", "name": ["x"]}, "name", "invalid_value"),
    ({"user": "alice", "revoked": False}, "revoked", "invalid_value"),
    ("not an object", None, "invalid_value"),
    ([{"user": "alice"}], None, "invalid_value"),
])
def test_bad_create_bodies_are_400_naming_the_field_and_store_nothing(
        replicas: tuple[Service, Service], redis_url: str, body: Any, param: str | None, code: str) -> None:
    with admin(replicas[0]) as http:
        response = http.post("/admin/keys", json=body)
    assert response.status_code == 400
    err = error_of(response)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert key_data(redis_url) == []


def test_body_that_is_not_json_is_400(replicas: tuple[Service, Service], redis_url: str) -> None:
    with admin(replicas[0]) as http:
        response = http.post("/admin/keys", content=b"user=alice",
                             headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_value"
    assert key_data(redis_url) == []


@pytest.mark.parametrize("body", [
    b'{"user": "sam", "webhook_url": "https://hooks.example.com/\\ud800"}',  # was stored, then a 500
    b'{"user": "sam", "\\udfff": 1}',  # the 400 naming the field could not be written: a 500
    b'{"user": "sam", "limits": {"\\ud800x": 1}}',
    b'{"user": "sam", "\\ud800": 1, "\\ud800": 2}',
])
def test_a_lone_surrogate_escape_is_400_and_stores_nothing(replicas: tuple[Service, Service], redis_url: str,
                                                           body: bytes) -> None:
    # Valid JSON, but "\ud800" decodes to no Unicode character: nothing could answer or list it in UTF-8.
    with admin(replicas[0]) as http:
        response = http.post("/admin/keys", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and error_of(response)["code"] == "invalid_value", response.text
        assert key_data(redis_url) == []
        assert http.get("/admin/keys", params={"user": "sam"}).json() == {"data": []}
    # A surrogate pair is one character, as any JSON parser reads it.
    key = create(replicas[0], {"user": "sam", "name": "\U0001f600"})
    raw = b'{"user": "sam", "name": "\\ud83d\\ude00"}'
    with admin(replicas[0]) as http:
        response = http.post("/admin/keys", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 201 and response.json()["name"] == key["name"] == "\U0001f600"


def test_a_lone_surrogate_in_a_generation_request_is_400(replicas: tuple[Service, Service]) -> None:
    key = create(replicas[0], {"user": "sam"})["key"]
    for body in (b'{"model": "gpt-image-1", "prompt": "a \\ud800 cat"}', b'{"prompt": "x", "\\udc00": 1}'):
        response = httpx.post(replicas[0].url + "/v1/images/generations", content=body, timeout=10,
                              headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        assert response.status_code == 400 and error_of(response)["code"] == "invalid_value", response.text


@pytest.mark.parametrize(("query", "param"), [({}, "user"), ({"user": "bad user"}, "user"),
                                             ({"user": "carol\n"}, "user")])
def test_listing_needs_a_valid_user(replicas: tuple[Service, Service], query: dict[str, str],
                                    param: str) -> None:
    with admin(replicas[0]) as http:
        response = http.get("/admin/keys", params=query)
    assert response.status_code == 400 and error_of(response)["param"] == param
