"""``python -m bench.redis_client``: what the Redis side of a request costs the gateway's worker.

5,000 admissions then their 5,000 settlements, all issued at once (as in a burst), through
the gateway's own ``Limiter`` against a private redis-server, in five set-ups:

1. one round trip per call over up to 512 connections, redis-py's Python packer and parser
   (the gateway before issue 9);
2. the same with hiredis parsing the replies;
3. the batcher (one pipeline per loop tick, 4 connections), Python packer and parser;
4. the batcher with hiredis parsing;
5. the batcher with hiredis parsing and packing (what the gateway runs).

Reports calls per second of the worker (CPU time of this process, the event loop, is what
limits a gateway worker) and wall time. Rewrites its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

from bench import report
from bench.procs import start_redis
from gateway.config import Limits
from gateway.limits.limiter import NO_USAGE, Limiter
from gateway.redisdb.batcher import Batcher
from gateway.redisdb.client import HiredisPacking
from gateway.redisdb.keys import RedisKeys

LIMITS = Limits(requests_per_minute=10**9, images_per_minute=10**9, max_concurrent_requests=10**6,
                tokens_per_day=10**12, tokens_per_month=10**12, images_per_day=10**12, images_per_month=10**12,
                usd_per_month=1e9)
SETUPS = [  # label, batched, hiredis parser, hiredis packer
    ("one round trip per call, 512 connections, Python parser", False, False, False),
    ("one round trip per call, 512 connections, hiredis parser", False, True, False),
    ("batched (4 connections), Python packer and parser", True, False, False),
    ("batched, hiredis parser", True, True, False),
    ("batched, hiredis parser and packer (the gateway)", True, True, True),
]


def client_for(url: str, hiredis_parser: bool, hiredis_packer: bool) -> Any:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=520, timeout=None,
        parser_class=_AsyncHiredisParser if hiredis_parser else _AsyncRESP2Parser)
    if hiredis_packer:
        pool.connection_class = type("Packed", (HiredisPacking, pool.connection_class), {})
    return aioredis.Redis(connection_pool=pool)


async def one_setup(url: str, n: int, batched: bool, parser: bool, packer: bool, tag: str) -> tuple[float, float]:
    client = client_for(url, parser, packer)
    batcher = Batcher(client, connections=4) if batched else Batcher(client, connections=512, max_batch=1)
    limiter = Limiter(client, RedisKeys("bench:"), lease_ms=600_000, batcher=batcher)
    await client.ping()
    now = int(time.time() * 1000)
    cpu, wall = time.process_time(), time.perf_counter()
    admissions = await asyncio.gather(*(
        limiter.admit(user=f"u{i % 50}", limits=LIMITS, request_id=f"{tag}-{i}", n=1, est_tokens=4160,
                      est_usd_micros=42_000, now_ms=now) for i in range(n)))
    await asyncio.gather(*(limiter.settle(a, NO_USAGE, {"request_id": a.request_id, "status": "200"})
                           for a in admissions))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await client.aclose()
    return 2 * n / cpu, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many rounds (3)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    when = report.now_utc().strftime("%Y-%m-%d %H:%M UTC")
    red = start_redis(Path(mkdtemp(prefix="bench-redis-")))
    url = f"redis://127.0.0.1:{red.port}/0"
    rows = []
    try:
        for label, batched, parse, pack in SETUPS:
            runs = sorted(asyncio.run(one_setup(url, args.requests, batched, parse, pack, f"{label[:3]}{r}"))
                          for r in range(args.rounds))
            per_cpu, wall = runs[len(runs) // 2]
            print(f"{label:60s} {per_cpu:9,.0f} calls per CPU-second  wall {wall:.2f} s", flush=True)
            rows.append((label, f"{per_cpu:,.0f}", f"{wall:.2f} s"))
    finally:
        red.stop()
    base = float(rows[0][1].replace(",", ""))
    rows = [(*r, f"{float(r[1].replace(',', '')) / base:.1f}x") for r in rows]
    text = "\n".join([
        f"## Redis client set-ups ({when})", "",
        f"- command: `python -m bench.redis_client`; {args.requests:,} admissions then their settlements, "
        f"all at once, through the gateway's Limiter; median of {args.rounds} rounds",
        f"- gateway revision: {report.git_revision()}", *report.machine_lines(), "",
        report.markdown_table(("set-up", "calls per CPU-second of the worker", "wall time", "vs first"), rows),
    ])
    print("\n" + text)
    if not args.no_write:
        report.upsert_section("redis client", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
