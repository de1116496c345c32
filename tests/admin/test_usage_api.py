"""``GET /admin/usage`` and ``GET /admin/usage/records`` on a real gateway process and Redis."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from gateway.limits.limiter import Limiter
from gateway.metering.ledger import FIELDS, iso_ms, usd_text
from gateway.metering.metrics import Metrics
from gateway.metering.settle_queue import SettleQueue
from gateway.redisdb.keys import RedisKeys
from tests.metering.test_ledger import DAY, T0, USAGE, settlement
from tests.support.procs import RedisServer, Service, start_gateway

TOKEN = "admin-token-test-admin-usage-77"
WINDOW = {"from": iso_ms(T0 - 60_000), "to": iso_ms(T0 + 3_600_000)}


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("gw")
    env = {"REDIS_URL": redis_server.url, "GATEWAY_ADMIN_TOKEN": TOKEN, "TTAPI_API_KEY": "tt-unused"}
    svc = start_gateway({"usage": {"spool_path": str(tmp / "spool")}}, env, tmp=tmp)
    yield svc
    svc.stop()


def get(gw: Service, path: str, token: str | None = TOKEN, **params: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(gw.url + path, params=params, headers=headers, timeout=30)


async def seed(url: str, records: dict[str, int]) -> None:
    """Settle ``count`` records per user, one second apart from T0."""
    client = Redis.from_url(url)
    queue = SettleQueue(Limiter(client, RedisKeys(), lease_ms=60_000), Metrics(), redis=client)
    for user, count in records.items():
        for i in range(count):
            await queue.settle(settlement(f"{user}-{i}", user, T0 + i * 1000))
    assert not queue.pending
    await client.aclose()


async def test_totals_of_a_day_and_a_month(gateway: Service, redis_url: str) -> None:
    await seed(redis_url, {"alice": 3, "bob": 1})
    r = get(gateway, "/admin/usage", user="alice", period=DAY)
    assert r.status_code == 200
    assert r.json() == {"user": "alice", "period": DAY, "requests": 3, "images": 3, "input_tokens": 30,
                        "input_text_tokens": 21, "input_image_tokens": 9,
                        "output_tokens": 3 * 4160, "total_tokens": 3 * 4170, "usd": usd_text(3 * USAGE.usd_micros)}
    assert get(gateway, "/admin/usage", user="bob", period=DAY[:7]).json()["requests"] == 1
    nobody = get(gateway, "/admin/usage", user="nobody", period=DAY).json()
    assert nobody["requests"] == nobody["total_tokens"] == 0 and nobody["usd"] == "0.000000"


async def test_records_are_streamed_as_jsonl_and_csv_across_pages(gateway: Service, redis_url: str) -> None:
    await seed(redis_url, {"alice": 1500, "bob": 700})  # more than one XRANGE page for alice
    with httpx.stream("GET", gateway.url + "/admin/usage/records", params=WINDOW, timeout=60,
                      headers={"authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        assert "content-length" not in r.headers  # streamed, not built in memory
        records = [json.loads(line) for line in r.iter_lines() if line]
    assert len(records) == 2200
    assert [r["request_id"] for r in records[:2]] == ["alice-0", "alice-1"] and records[-1]["user"] == "bob"
    assert all(list(r) == list(FIELDS) for r in records)
    rows = list(csv.DictReader(io.StringIO(get(gateway, "/admin/usage/records", **WINDOW, format="csv").text)))
    assert len(rows) == 2200 and rows[0]["request_id"] == "alice-0" and rows[0]["usd"] == usd_text(USAGE.usd_micros)
    only_bob = get(gateway, "/admin/usage/records", **WINDOW, user="bob").text.splitlines()
    assert len(only_bob) == 700
    narrow = get(gateway, "/admin/usage/records", **{"from": iso_ms(T0 + 10_000), "to": iso_ms(T0 + 12_000)})
    assert [json.loads(line)["request_id"] for line in narrow.text.splitlines()] == [
        "alice-10", "alice-11", "bob-10", "bob-11"]


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/admin/usage", {"period": "2026-11-24"}, "user"),
    ("/admin/usage", {"user": "alice"}, "period"),
    ("/admin/usage", {"user": "alice", "period": "2026-13"}, "period"),
    ("/admin/usage", {"user": "alice", "period": "yesterday"}, "period"),
    ("/admin/usage", {"user": "a{b}", "period": "2026-11"}, "user"),
    ("/admin/usage/records", {"to": "2026-11-25T00:00:00Z"}, "from"),
    ("/admin/usage/records", {"from": "2026-11-24T00:00:00Z"}, "to"),
    ("/admin/usage/records", {"from": "last week", "to": "2026-11-25T00:00:00Z"}, "from"),
    ("/admin/usage/records", {"from": "2026-11-25T00:00:00Z", "to": "2026-11-24T00:00:00Z"}, "from"),
    ("/admin/usage/records", {**WINDOW, "format": "xml"}, "format"),
    ("/admin/usage/records", {**WINDOW, "user": "../x"}, "user"),
])
def test_bad_parameters_are_openai_shaped_400s(gateway: Service, path: str, params: dict[str, str],
                                               param: str) -> None:
    r = get(gateway, path, **params)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_admin_token_is_required(gateway: Service) -> None:
    for path, params in (("/admin/usage", {"user": "a", "period": "2026-11"}), ("/admin/usage/records", WINDOW)):
        for token in (None, "wrong-token"):
            r = get(gateway, path, token, **params)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert "wrong-token" not in r.text


def test_without_admin_token_the_usage_api_does_not_exist(redis_url: str, tmp_path: Path) -> None:
    gw = start_gateway({"usage": {"spool_path": str(tmp_path / "spool")}},
                       {"REDIS_URL": redis_url, "GATEWAY_ADMIN_TOKEN": ""}, tmp=tmp_path)
    try:
        assert get(gw, "/admin/usage", user="a", period="2026-11").status_code == 404
        assert get(gw, "/admin/usage/records", **WINDOW).status_code == 404
    finally:
        gw.stop()
