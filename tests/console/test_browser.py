"""The console in a real browser: Debian's chromium driven by Playwright, against real processes.

Screenshots of every page land in build/screenshots/console/ (look at them: they are the test's artefacts).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.procs import RedisServer, Service, start_fake_upstream, start_gateway, wait_until

TOKEN = "console-browser-admin-token-42"
UPSTREAM_KEY = "tt-console-key"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots" / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    fake = start_fake_upstream(UPSTREAM_KEY)
    env = {"REDIS_URL": redis_server.url, "GATEWAY_ADMIN_TOKEN": TOKEN, "TTAPI_API_KEY": UPSTREAM_KEY,
           "UPSTREAM_BASE_URL": fake.url}
    models = {"gpt-image-1": {"input_text_per_1m": 5.0, "input_image_per_1m": 10.0, "output_per_1m": 40.0},
              "dall-e-3": {"per_image": {"standard-1024x1024": 0.04}}}
    config = {"models": models, "plans": {"default": {}, "team-gold": {"requests_per_minute": 100}}}
    svc = start_gateway(config, env,
                        tmp=tmp_path_factory.mktemp("gw"))
    yield svc
    svc.stop()
    fake.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed for the console tests: `make tools` installs it")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def sign_in(page: Page, gw: Service, token: str = TOKEN) -> Any:
    page.goto(gw.url + "/admin/ui/signin")
    page.get_by_label("Admin token").fill(token)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()


def test_sign_in_with_a_wrong_then_the_right_token(page: Page, gateway: Service) -> None:
    sign_in(page, gateway, "not-the-token")
    expect(page.get_by_role("alert")).to_contain_text("not the admin token")
    page.screenshot(path=str(SHOTS / "signin-refused.png"))
    sign_in(page, gateway)
    expect(page).to_have_url(gateway.url + "/admin/ui/usage")
    response = page.goto(gateway.url + "/admin/ui/usage")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp


def test_create_use_and_revoke_a_key(page: Page, gateway: Service) -> None:
    sign_in(page, gateway)
    page.goto(gateway.url + "/admin/ui/keys?user=erin")
    page.get_by_label("Team", exact=True).fill("art")
    page.get_by_label("Plan").select_option("team-gold")
    page.get_by_label("Name", exact=True).fill("<b>night batch</b>")
    page.get_by_role("button", name="Create key").click()
    key = page.locator("#new-key").inner_text()
    assert key.startswith("sk-")
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    page.screenshot(path=str(SHOTS / "key-created.png"), full_page=True)

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    assert client.images.generate(model="gpt-image-1", prompt="a key from the console", quality="low").data

    page.goto(gateway.url + "/admin/ui/keys?user=erin")
    assert key not in page.content()
    expect(page.get_by_role("cell", name="<b>night batch</b>")).to_be_visible()  # markup shown as text
    page.screenshot(path=str(SHOTS / "keys.png"), full_page=True)
    page.get_by_role("link", name="Revoke…").click()
    page.screenshot(path=str(SHOTS / "revoke-confirm.png"))
    page.get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("status")).to_contain_text("was revoked")

    def refused() -> bool:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    wait_until(refused, "revoked key refused", timeout=10)


def test_usage_page_matches_the_admin_api_and_draws_charts(page: Page, gateway: Service) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=_new_key(gateway, "frank"), max_retries=0)
    for _ in range(3):
        client.images.generate(model="gpt-image-1", prompt="traffic for the chart", quality="low")
    sign_in(page, gateway)
    page.goto(gateway.url + "/admin/ui/usage?user=frank")
    import datetime as dt

    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    api = httpx.get(gateway.url + "/admin/usage", params={"user": "frank", "period": month},
                    headers={"authorization": f"Bearer {TOKEN}"}).json()
    card = page.get_by_label(f"This month ({month})")
    expect(card.locator('[data-field="requests"]')).to_have_text(f"{api['requests']:,}")
    expect(card.locator('[data-field="total_tokens"]')).to_have_text(f"{api['total_tokens']:,}")
    expect(card.locator('[data-field="usd"]')).to_have_text(f"${float(api['usd']):,.4f}")
    assert api["requests"] == 3
    expect(page.locator("svg.chart")).to_have_count(3)
    assert page.locator("svg.chart rect.bar").count() == 90
    page.screenshot(path=str(SHOTS / "usage.png"), full_page=True)
    page.goto(gateway.url + "/admin/ui/usage")
    expect(page.get_by_role("link", name="frank")).to_be_visible()  # in the top users


def test_live_and_records_pages(page: Page, gateway: Service) -> None:
    sign_in(page, gateway)
    page.goto(gateway.url + "/admin/ui/live")
    expect(page.get_by_text("answering")).to_be_visible()
    page.screenshot(path=str(SHOTS / "live.png"), full_page=True)
    page.goto(gateway.url + "/admin/ui/records")
    expect(page.locator("table.records tbody tr").first).to_be_visible()
    page.screenshot(path=str(SHOTS / "records.png"), full_page=True)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    text = Path(download.value.path()).read_text()
    assert text.startswith("request_id,")


def test_a_cross_site_form_post_is_refused(page: Page, gateway: Service) -> None:
    sign_in(page, gateway)
    status = page.evaluate("""async () => (await fetch('/admin/ui/keys', {method: 'POST',
        headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'user=mallory'})).status""")
    assert status == 403


def _new_key(gw: Service, user: str) -> str:
    r = httpx.post(gw.url + "/admin/keys", json={"user": user}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])
