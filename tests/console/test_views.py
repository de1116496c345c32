"""The console's pages in-process against a real Redis: sign-in, sessions, CSRF, escaping, headers, numbers."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
import redis

from gateway.config import parse_settings
from gateway.redisdb.keys import RedisKeys
from tests.support.asgi import app_client

TOKEN = "console-admin-token-0123456789"
PAGES = ("/admin/ui/keys?user=alice", "/admin/ui/usage", "/admin/ui/live", "/admin/ui/records")


def settings(redis_url: str, admin: bool = True) -> object:
    env = {"REDIS_URL": redis_url, "TTAPI_API_KEY": "tt-unused", **({"GATEWAY_ADMIN_TOKEN": TOKEN} if admin else {})}
    return parse_settings({"plans": {"default": {}, "gold": {}}}, env=env)


@pytest.fixture
async def console(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings(redis_url)) as (client, _):
        yield client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match[1]


async def sign_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    form = await client.get("/admin/ui/signin")
    return await client.post("/admin/ui/signin", data={"csrf": csrf_of(form.text), "token": token})


async def test_pages_need_a_session(console: httpx.AsyncClient) -> None:
    for page in PAGES:
        r = await console.get(page)
        assert r.status_code == 303 and r.headers["location"] == "/admin/ui/signin"


async def test_a_wrong_token_is_refused_and_counted_by_the_guard(console: httpx.AsyncClient, redis_url: str) -> None:
    r = await sign_in(console, "wrong")
    assert r.status_code == 401 and "not the admin token" in r.text
    assert "igw_console" not in r.cookies
    # Counted as a wrong admin token, apart from failed API keys.
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(RedisKeys().admin_auth_failures("127.0.0.1")) == 1
    assert client.exists(RedisKeys().auth_failures("127.0.0.1")) == 0


async def test_sign_in_sets_a_strict_http_only_cookie_for_twelve_hours(console: httpx.AsyncClient) -> None:
    r = await sign_in(console)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "igw_console=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert "max-age=43200" in cookie and "path=/admin/ui" in cookie and "secure" not in cookie  # plain http here
    for page in PAGES:
        assert (await console.get(page)).status_code == 200, page


async def test_every_page_sends_a_strict_content_security_policy(console: httpx.AsyncClient) -> None:
    await sign_in(console)
    for page in ("/admin/ui/signin", *PAGES):
        r = await console.get(page, follow_redirects=True)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert "<script>" not in r.text and " on" + "click=" not in r.text  # no inline script anywhere


async def test_a_post_without_the_csrf_token_is_refused(console: httpx.AsyncClient, redis_url: str) -> None:
    await sign_in(console)
    r = await console.post("/admin/ui/keys", data={"user": "mallory"})
    assert r.status_code == 403
    r = await console.post("/admin/ui/keys", data={"user": "mallory", "csrf": "forged"})
    assert r.status_code == 403
    import redis

    assert redis.Redis.from_url(redis_url).scard("igw:{u:mallory}:keys") == 0


async def test_create_shows_the_key_once_and_markup_in_names_as_text(console: httpx.AsyncClient) -> None:
    await sign_in(console)
    page = await console.get("/admin/ui/keys?user=alice")
    made = await console.post("/admin/ui/keys", data={"csrf": csrf_of(page.text), "user": "alice", "plan": "gold",
                                                      "name": "<script>alert(1)</script>", "team": "art"})
    assert made.status_code == 200 and made.headers["cache-control"] == "no-store"
    key = re.search(r'id="new-key">([^<]+)<', made.text)
    assert key and key[1].startswith("sk-")
    listing = await console.get("/admin/ui/keys?user=alice")
    assert key[1] not in listing.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listing.text and "<script>alert" not in listing.text


async def test_keys_made_and_revoked_in_the_console_are_logged_as_by_the_admin_api(
        console: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.admin")
    await sign_in(console)
    page = await console.get("/admin/ui/keys?user=alice")
    made = await console.post("/admin/ui/keys", data={"csrf": csrf_of(page.text), "user": "alice"})
    key = re.search(r'id="new-key">([^<]+)<', made.text)
    logged = re.search(r"console: created key (key_\w+) for user alice", caplog.text)
    assert key and logged and key[1] not in caplog.text  # the id, never the plaintext
    await console.post(f"/admin/ui/keys/{logged[1]}/revoke", data={"csrf": csrf_of(page.text), "user": "alice"})
    assert f"console: revoked key {logged[1]}" in caplog.text


async def test_a_bad_field_is_shown_on_the_form_and_nothing_is_created(console: httpx.AsyncClient) -> None:
    await sign_in(console)
    page = await console.get("/admin/ui/keys?user=alice")
    r = await console.post("/admin/ui/keys", data={"csrf": csrf_of(page.text), "user": "alice",
                                                   "expires_at": "yesterday"})
    assert r.status_code == 400 and "expires_at" in r.text
    assert "No active keys for alice" in r.text


async def test_sign_out_ends_the_session_everywhere(console: httpx.AsyncClient) -> None:
    await sign_in(console)
    stolen = console.cookies.get("igw_console")
    page = await console.get("/admin/ui/usage")
    await console.post("/admin/ui/signout", data={"csrf": csrf_of(page.text)})
    console.cookies.set("igw_console", stolen or "", path="/admin/ui")
    assert (await console.get("/admin/ui/usage")).status_code == 303


async def test_a_one_time_code_signs_in_once(console: httpx.AsyncClient) -> None:
    r = await console.post("/admin/console/codes", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201
    url = r.json()["url"]
    assert TOKEN not in url
    first = await console.get(url)
    assert first.status_code == 200 and "igw_console" in first.headers["set-cookie"]
    console.cookies.clear()
    assert (await console.get(url)).status_code == 401


async def test_usage_page_shows_the_admin_api_totals(console: httpx.AsyncClient, redis_url: str) -> None:
    from tests.admin.test_usage_api import seed
    from tests.metering.test_ledger import T0

    day = datetime.now(UTC)
    if datetime.fromtimestamp(T0 / 1000, UTC).month != day.month:
        pytest.skip("the seeded records fall in last month (first hour of a month)")
    await seed(redis_url, {"alice": 3})
    await sign_in(console)
    totals = await console.get("/admin/usage", params={"user": "alice", "period": f"{day:%Y-%m}"},
                               headers={"authorization": f"Bearer {TOKEN}"})
    assert totals.json()["requests"] == 3
    page = await console.get("/admin/ui/usage?user=alice")
    assert page.status_code == 200 and page.text.count("<svg") == 3
    month = page.text[page.text.index("This month"):]
    for field in ("requests", "images", "total_tokens"):
        shown = re.search(rf'data-field="{field}">([^<]+)<', month)
        assert shown and shown[1] == f"{totals.json()[field]:,}", field


@pytest.mark.parametrize(("query", "field"), [({"user": "bob smith"}, "user"),
                                             ({"team": '"><img src=x onerror=alert(1)>'}, "team")])
async def test_a_bad_usage_filter_is_a_console_page_naming_the_field(console: httpx.AsyncClient, query: dict[str, str],
                                                                    field: str) -> None:
    await sign_in(console)
    page = await console.get("/admin/ui/usage", params=query)
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    error = re.search(r'<p class="error" role="alert">([^<]+)</p>', page.text)
    assert error and error[1].startswith(f"&#39;{field}&#39; must be"), page.text[:300]
    assert "<img src=x" not in page.text and "Sign out" in page.text  # escaped, inside the console's frame


async def test_the_console_is_not_there_without_an_admin_token(redis_url: str) -> None:
    async with app_client(settings(redis_url, admin=False)) as (client, _):
        assert (await client.get("/admin/ui/signin")).status_code == 404
        assert (await client.get("/admin/ui/static/console.css")).status_code == 404
        for path in ("/admin/ui", "/admin/ui/"):  # not a redirect either: nothing tells the console exists
            assert (await client.get(path, follow_redirects=False)).status_code == 404
