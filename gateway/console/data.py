"""What the console pages show, read from the same Redis aggregates and ledger as the admin API."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.metering.ledger import TOTAL_FIELDS, iter_records, known_users, period_key, usd_text
from gateway.redisdb.keys import RedisKeys

DAYS = 30
TOP = 10
MODEL_SCAN_LIMIT = 20_000  # ledger records read for "top models" (bounded: a console page, not a report)


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: str
    tokens: int
    images: int
    usd_micros: int


def last_days(today: date, days: int = DAYS) -> list[str]:
    return [(today - timedelta(days=i)).isoformat() for i in range(days - 1, -1, -1)]


async def _sum_periods(client: Any, keys: RedisKeys, users: list[str], periods: list[str]) -> list[dict[str, int]]:
    """Per period, the settled totals summed over ``users`` (pipelined HGETALLs)."""
    sums = [dict.fromkeys((*TOTAL_FIELDS, "usd_micros"), 0) for _ in periods]
    for user in users:
        pipe = client.pipeline(transaction=False)
        for period in periods:
            pipe.hgetall(period_key(keys, user, period))
        for total, raw in zip(sums, await pipe.execute(), strict=True):
            for k, v in raw.items():
                name = k.decode() if isinstance(k, bytes) else str(k)
                if name in total:
                    total[name] += int(v)
    return sums


def as_totals(raw: dict[str, int]) -> dict[str, Any]:
    """The shape of ``GET /admin/usage`` (without user and period)."""
    out: dict[str, Any] = {name: raw.get(name, 0) for name in TOTAL_FIELDS}
    out["usd"] = usd_text(raw.get("usd_micros", 0))
    return out


async def users_of_team(keystore: Any, team: str) -> list[str]:
    return sorted({k.user for k in await keystore.list(None) if k.team == team})


async def usage_overview(client: Any, keys: RedisKeys, users: list[str], now: datetime) -> dict[str, Any]:
    """Today's and this month's totals, and 30 days of tokens, images and cost, summed over ``users``."""
    days = last_days(now.date())
    month = f"{now:%Y-%m}"
    sums = await _sum_periods(client, keys, users, [*days, month])
    series = [DayUsage(d, s.get("total_tokens", 0), s.get("images", 0), s.get("usd_micros", 0))
              for d, s in zip(days, sums, strict=False)]
    return {"today": as_totals(sums[len(days) - 1]), "month": as_totals(sums[-1]), "series": series}


async def top_users(client: Any, keys: RedisKeys, now: datetime) -> list[dict[str, Any]]:
    """This month's users by cost, then images (at most ``TOP``)."""
    users = await known_users(client, keys)
    month = f"{now:%Y-%m}"
    rows = []
    for user in users:
        (raw,) = await _sum_periods(client, keys, [user], [month])
        if raw.get("requests"):
            rows.append({"user": user, **as_totals(raw), "usd_micros": raw.get("usd_micros", 0)})
    rows.sort(key=lambda r: (r["usd_micros"], r["images"]), reverse=True)
    return rows[:TOP]


async def top_models(client: Any, keys: RedisKeys, user: str | None, now: datetime) -> list[dict[str, Any]]:
    """Models by cost over the last 30 days, from the ledger (at most ``MODEL_SCAN_LIMIT`` records read)."""
    start = datetime.combine(now.date() - timedelta(days=DAYS - 1), datetime.min.time(), UTC)
    cost: Counter[str] = Counter()
    images: Counter[str] = Counter()
    seen = 0
    async for record in iter_records(client, keys, int(start.timestamp() * 1000), int(now.timestamp() * 1000) + 1,
                                     user=user):
        cost[record["model"]] += round(float(record["usd"]) * 1_000_000)
        images[record["model"]] += int(record["images"])
        seen += 1
        if seen >= MODEL_SCAN_LIMIT:
            break
    ranked = sorted(cost, key=lambda m: (cost[m], images[m]), reverse=True)[:TOP]
    return [{"model": m, "usd": usd_text(cost[m]), "images": images[m]} for m in ranked]
