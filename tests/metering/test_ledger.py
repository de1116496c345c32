"""The ledger record, its reading code, and settlements that outlive a Redis outage or a restart.

Real redis-server processes; Redis is stopped and started to make settle fail for real.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.auth.authenticator import Principal
from gateway.config import Limits, RedisSettings
from gateway.limits.limiter import Limiter, SettledUsage, utc_periods
from gateway.metering.ledger import (
    CSV_HEADER,
    FIELDS,
    build_record,
    csv_record,
    decode_record,
    iso_ms,
    iter_records,
    parse_iso,
    period_totals,
    unsettled_record,
    usd_text,
)
from gateway.metering.metrics import Metrics
from gateway.metering.settle_queue import Settlement, SettleQueue, Spool, unmetered_admission
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.request import EDITS, ImageRequest
from gateway.redisdb.client import open_redis
from gateway.redisdb.keys import RedisKeys
from tests.support.procs import RedisServer

KEYS = RedisKeys()
# An hour ago, whole seconds: a record's stream id (the settle instant) is never before its time.
T0 = (time.time_ns() // 1_000_000 - 3_600_000) // 1000 * 1000
DAY = utc_periods(T0).day


def exchange(rid: str, user: str = "alice", *, started_ms: int = T0, status: int = 200,
             stream: bool = False) -> Exchange:
    principal = Principal(key_id="k_1234", user=user, team="art", plan="default", limits=Limits(), models=None)
    request = ImageRequest(model="gpt-image-1", family="gpt-image", prompt="a secret prompt", n=1,
                           size="1024x1024", quality="high", stream=stream, partial_images=0,
                           response_format=None, output_format=None, model_defaulted=False)
    return Exchange(rid, principal, request, started_ms=started_ms, status=status)


USAGE = SettledUsage(input_text_tokens=7, input_image_tokens=3, output_tokens=4160, total_tokens=4170, images=1,
                     usd_micros=166_465)


def settlement(rid: str, user: str = "alice", started_ms: int = T0, usage: SettledUsage = USAGE) -> Settlement:
    ex = exchange(rid, user, started_ms=started_ms)
    return Settlement(unmetered_admission(rid, user, started_ms), usage, build_record(ex, usage, 1234))


async def wait_for(check: Any, what: str, limit_s: float = 30.0) -> None:
    """Poll ``check()`` (readiness polling, not a sleep as synchronisation)."""
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


# --- the record ------------------------------------------------------------------------------


def test_usd_text_is_exact() -> None:
    assert usd_text(0) == "0.000000"
    assert usd_text(40_000) == "0.040000"
    assert usd_text(123_456_789) == "123.456789"


def test_iso_round_trip() -> None:
    noon = parse_iso("2026-11-24T12:00:00Z")
    assert iso_ms(noon + 123) == "2026-11-24T12:00:00.123Z"
    assert parse_iso(iso_ms(noon + 123)) == noon + 123
    assert parse_iso("2026-11-24T13:00:00+01:00") == noon
    assert parse_iso("2026-11-24T12:00:00") == noon  # naive means UTC


def test_record_has_exactly_the_schema_and_no_secret() -> None:
    ex = exchange("req1", stream=True)
    ex.incomplete, ex.client_gone = True, True
    record = build_record(ex, USAGE, 1500)
    assert tuple(record) == FIELDS
    assert all(isinstance(v, str) for v in record.values())
    typed = decode_record({k.encode(): v.encode() for k, v in record.items()})
    assert typed == {
        "request_id": "req1", "time": iso_ms(T0), "user": "alice", "team": "art",
        "key_id": "k_1234", "route": "generations", "model": "gpt-image-1", "size": "1024x1024",
        "quality": "high", "n": 1,
        "stream": True, "status": 200, "input_tokens": 10, "input_text_tokens": 7, "input_image_tokens": 3,
        "output_tokens": 4160, "total_tokens": 4170, "images": 1, "usd": "0.166465", "latency_ms": 1500,
        "incomplete": True, "client_gone": True, "settled": True}
    assert "secret" not in str(record)
    # Records written before `settled` existed were all settled.
    old = {k.encode(): v.encode() for k, v in record.items() if k != "settled"}
    assert decode_record(old)["settled"] is True


def test_unsettled_record_carries_the_estimate() -> None:
    record = decode_record(unsettled_record(exchange("req2"), 4170, 166_465))
    assert (record["settled"], record["status"], record["total_tokens"], record["images"], record["usd"],
            record["output_tokens"], record["incomplete"]) == (False, 0, 4170, 1, "0.166465", 0, True)
    assert (record["user"], record["model"], record["time"]) == ("alice", "gpt-image-1", iso_ms(T0))


def test_an_edit_is_recorded_as_route_edits_and_old_records_read_as_generations() -> None:
    ex = exchange("req2")
    ex.route = EDITS
    record = build_record(ex, USAGE, 1)
    assert record["route"] == "edits"
    del record["route"]  # a record written before edits existed
    assert decode_record(record)["route"] == "generations"


def test_csv_row_quotes_and_nulls() -> None:
    assert CSV_HEADER == b",".join(f.encode() for f in FIELDS) + b"\r\n"
    record = decode_record(build_record(exchange("r,1"), USAGE, 1))
    record["team"] = None
    row = csv_record(record).decode()
    assert row == (f'"r,1",{iso_ms(T0)},alice,,k_1234,generations,gpt-image-1,1024x1024,high,1,false,200,'
                   '10,7,3,4160,4170,1,0.166465,1,false,false,true\r\n')
    assert next(csv.reader(io.StringIO(row)))[0] == "r,1"


@pytest.mark.parametrize("value", ['=HYPERLINK("https://evil.example","x")', "+1+2", "-2+3", "@SUM(A1)",
                                   "\tcmd", "\r=1"])
def test_csv_cells_that_a_spreadsheet_would_run_get_a_quote_prefix(value: str) -> None:
    record = decode_record(build_record(exchange("r1"), USAGE, 1))
    record["size"], record["quality"], record["user"] = value, value, value
    row = next(csv.reader(io.StringIO(csv_record(record).decode(), newline="")))
    assert row[FIELDS.index("size")] == row[FIELDS.index("quality")] == row[FIELDS.index("user")] == "'" + value
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


# --- reading ---------------------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_export_pages_filters_on_time_and_merges_users(client: Redis) -> None:
    limiter = Limiter(client, KEYS, lease_ms=60_000)
    queue = SettleQueue(limiter, Metrics(), redis=client)
    day = 86_400_000
    # bob's records settle out of time order (a late one first); 7 records per user, pages of 3.
    for i, offset in enumerate([5, 0, 1, 2, 3, 4, 6]):
        await queue.settle(settlement(f"b{i}", "bob", T0 + offset * 1000))
        await queue.settle(settlement(f"a{i}", "alice", T0 + offset * 1000))
    await queue.settle(settlement("old", "alice", T0 - day))
    got = [r async for r in iter_records(client, KEYS, T0, T0 + 5000, page=3)]
    # alice first (users in name order), each user's records in settle order, time in [from, to).
    assert [r["request_id"] for r in got] == ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "b5"]
    only_bob = [r["request_id"] async for r in iter_records(client, KEYS, T0, T0 + 10_000, user="bob", page=2)]
    assert sorted(only_bob) == [f"b{i}" for i in range(7)]
    totals = await period_totals(client, KEYS, "alice", DAY)
    assert totals == {"user": "alice", "period": DAY, "requests": 7, "images": 7, "input_tokens": 70,
                          "input_text_tokens": 49, "input_image_tokens": 21,
                      "output_tokens": 7 * 4160, "total_tokens": 7 * 4170, "usd": usd_text(7 * 166_465)}
    month = await period_totals(client, KEYS, "alice", utc_periods(T0).month)
    assert month["requests"] == 7 + (utc_periods(T0 - day).month == utc_periods(T0).month)
    assert await client.smembers(KEYS.users()) == {b"alice", b"bob"}


# --- Redis down: queue, retry, spool ---------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def make_queue(server: RedisServer, spool: Path | None = None) -> tuple[SettleQueue, Metrics, Any]:
    client = open_redis(RedisSettings(url=server.url, timeout_seconds=0.5))
    metrics = Metrics()
    queue = SettleQueue(Limiter(client, KEYS, lease_ms=60_000), metrics, redis=client,
                        spool=Spool(str(spool)) if spool else None)
    return queue, metrics, client


def ledger_ids(server: RedisServer, user: str = "alice") -> list[str]:
    return [dict(f)[b"request_id"].decode() for _, f in server.client().xrange(KEYS.ledger(user))]


async def test_settle_while_redis_is_down_is_retried_exactly_once(own_redis: RedisServer) -> None:
    queue, metrics, client = make_queue(own_redis)
    try:
        own_redis.stop()
        await queue.settle(settlement("r1"))  # returns although Redis is down
        assert len(queue.pending) == 1
        assert metrics.registry.get_sample_value("gateway_usage_pending_settlements") == 1
        assert metrics.registry.get_sample_value("gateway_redis_errors_total", {"op": "settle"}) >= 1
        await queue.settle(settlement("r2"))  # joins the queue behind r1, no new attempt on the request path
        assert [s.admission.request_id for s in queue.pending] == ["r1", "r2"]
        own_redis.start()

        async def drained() -> bool:
            return not queue.pending

        await wait_for(drained, "queue drained after Redis came back")
        assert ledger_ids(own_redis) == ["r1", "r2"]
        assert metrics.registry.get_sample_value("gateway_usage_pending_settlements") == 0
        await queue.settle(settlement("r1"))  # a repeated settle is a no-op
        assert ledger_ids(own_redis) == ["r1", "r2"]
        assert int(own_redis.client().hget(KEYS.day_usage("alice", DAY), "requests")) == 2
    finally:
        await queue.close()
        await client.aclose()


async def test_unsent_settlements_are_spooled_at_close_and_replayed_once(own_redis: RedisServer,
                                                                        tmp_path: Path) -> None:
    spool = tmp_path / "spool" / "usage.spool"
    queue, _, client = make_queue(own_redis, spool)
    own_redis.stop()
    await queue.settle(settlement("s1"))
    await queue.settle(settlement("s2", "bob"))
    await queue.close()
    await client.aclose()
    lines = spool.read_bytes().splitlines()
    assert len(lines) == 2 and b"s1" in lines[0] and b"s2" in lines[1]
    assert b"secret" not in spool.read_bytes()
    os.chmod(spool, 0o600)

    own_redis.start()
    for _ in range(2):  # the second start finds nothing left to replay
        queue, _, client = make_queue(own_redis, spool)
        await queue.start()

        async def drained(q: SettleQueue = queue) -> bool:
            return not q.pending

        await wait_for(drained, "replayed")
        await queue.close()
        await client.aclose()
        assert ledger_ids(own_redis, "alice") == ["s1"]
        assert ledger_ids(own_redis, "bob") == ["s2"]
        assert list(spool.parent.iterdir()) == []


async def test_replaying_a_settlement_twice_counts_it_once(own_redis: RedisServer, tmp_path: Path) -> None:
    spool = tmp_path / "usage.spool"
    Spool(str(spool)).append([settlement("d1"), settlement("d1"), settlement("d2")])
    queue, _, client = make_queue(own_redis, spool)
    await queue.start()

    async def drained() -> bool:
        return not queue.pending

    await wait_for(drained, "replayed")
    await queue.close()
    await client.aclose()
    assert ledger_ids(own_redis) == ["d1", "d2"]
    assert int(own_redis.client().hget(KEYS.day_usage("alice", DAY), "output_tokens")) == 2 * 4160


def test_append_after_a_claim_goes_to_a_new_file(tmp_path: Path) -> None:
    path = str(tmp_path / "usage.spool")
    spool = Spool(path)
    spool.append([settlement("c1")])
    claimed = spool.claim()
    assert [[s.admission.request_id for s in items] for _, items in claimed] == [["c1"]]
    spool.append([settlement("c2")])  # a worker shutting down after the claim: a fresh spool file
    assert [[s.admission.request_id for s in items] for _, items in spool.claim()] == [["c2"]]
    assert spool.claim() == []  # files it claimed itself are not orphans
    # A new process with the same pid (a restarted container) takes over what the old one left claimed.
    taken = Spool(path).claim()
    assert sorted(s.admission.request_id for _, items in taken for s in items) == ["c1", "c2"]


def test_a_dead_workers_claimed_file_is_taken_over(tmp_path: Path) -> None:
    path = str(tmp_path / "usage.spool")
    Spool(path + ".tmp").append([settlement("o1")])
    os.rename(path + ".tmp", f"{path}.999999999.abcd.replaying")  # a pid that cannot be alive
    claimed = Spool(path).claim()
    assert [[s.admission.request_id for s in items] for _, items in claimed] == [["o1"]]
