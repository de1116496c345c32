"""Image-store client choice: aiobotocore against miniopy-async on a local SeaweedFS.

    python -m bench.storage [--puts 60] [--concurrency 8] [--no-write]

Needs ``pip install miniopy-async`` (the candidate not chosen; not in the extras).
Starts ``weed server -s3`` (gateway/devtools/seaweed.py), then runs each client in a fresh
Python process (so import time and RSS are its own): put of a ~1.5 MB PNG plus a presigned
GET, first one at a time, then ``--concurrency`` at once; presign alone; RSS added by the
import and by the run. Installed size is the client's dependency closure minus what the
gateway installs anyway. Writes the ``storage`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.report import git_revision, machine_lines, markdown_table, now_utc, upsert_section
from gateway.devtools.fake_images import png
from gateway.devtools.seaweed import SeaweedS3

CLIENTS = ("aiobotocore", "miniopy-async")
IMAGE_BYTES = 1_500_000
PRESIGNS = 2000


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- worker: one client, in its own process ---------------------------------------------------------

class _Boto:
    """aiobotocore as the gateway runs it: ImageStore's put_blob and presigned_url (its client config)."""

    def __init__(self, endpoint: str, key: str, secret: str) -> None:
        self.args = (endpoint, key, secret)
        self.store: Any = None

    async def __aenter__(self) -> _Boto:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()

    async def make_bucket(self, bucket: str) -> None:
        from prometheus_client import CollectorRegistry

        from gateway.imagestore.settings import StorageSettings
        from gateway.imagestore.store import ImageStore
        from gateway.metering.metrics import Metrics

        endpoint, key, secret = self.args
        settings = StorageSettings(endpoint_url=endpoint, bucket=bucket, access_key_id=key, secret_access_key=secret)
        self.store = ImageStore(settings, Metrics(CollectorRegistry()))
        await self.store.start()

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        await self.store.put_blob(key, data)

    async def presign(self, bucket: str, key: str) -> str:
        return str(await self.store.presigned_url(key))


class _Minio:
    """miniopy-async: put_object (a stream and its length) + presigned_get_object."""

    def __init__(self, endpoint: str, key: str, secret: str) -> None:
        self.args = (endpoint, key, secret)

    async def __aenter__(self) -> _Minio:
        from miniopy_async import Minio  # type: ignore[attr-defined]

        endpoint, key, secret = self.args
        self.client = Minio(endpoint.split("://", 1)[1], access_key=key, secret_key=secret, secure=False,
                            region="us-east-1")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close_session()

    async def make_bucket(self, bucket: str) -> None:
        await self.client.make_bucket(bucket)

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        import io

        await self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type="image/png")

    async def presign(self, bucket: str, key: str) -> str:
        from datetime import timedelta

        return await self.client.presigned_get_object(bucket, key, expires=timedelta(seconds=3600))


async def _measure(client: str, endpoint: str, key: str, secret: str, puts: int, concurrency: int) -> dict:
    # The gateway has these loaded already: count only what the client adds.
    import aiohttp  # noqa: F401
    import prometheus_client  # noqa: F401

    import gateway.errors
    import gateway.metering.metrics

    rss0 = _rss_kib()
    t0 = time.perf_counter()
    if client == "aiobotocore":
        import gateway.imagestore.store  # noqa: F401 - aiobotocore and botocore
        adapter: _Boto | _Minio = _Boto(endpoint, key, secret)
    else:
        import miniopy_async  # noqa: F401
        adapter = _Minio(endpoint, key, secret)
    import_s = time.perf_counter() - t0
    rss_import = _rss_kib()
    data = png(b"bench-storage", pad_bytes=IMAGE_BYTES)
    bucket = "bench-" + client.replace("-", "").replace("_", "") + f"-{int(time.time())}"
    async with adapter as s3:
        await s3.make_bucket(bucket)
        await s3.put(bucket, "warmup.png", data)

        async def one(i: int) -> float:
            start = time.perf_counter()
            await s3.put(bucket, f"{i}.png", data)
            await s3.presign(bucket, f"{i}.png")
            return time.perf_counter() - start

        t, cpu = time.perf_counter(), time.process_time()
        serial = [await one(i) for i in range(puts)]
        serial_s, serial_cpu = time.perf_counter() - t, time.process_time() - cpu
        sem = asyncio.Semaphore(concurrency)

        async def gated(i: int) -> float:
            async with sem:
                return await one(i)

        t = time.perf_counter()
        await asyncio.gather(*(gated(puts + i) for i in range(puts)))
        concurrent_s = time.perf_counter() - t
        cpu = time.process_time()
        for i in range(PRESIGNS):
            await s3.presign(bucket, f"{i % puts}.png")
        presign_cpu = time.process_time() - cpu
        url = await s3.presign(bucket, "0.png")
    return {"client": client, "version": metadata.version(client), "import_ms": import_s * 1000,
            "rss_import_kib": rss_import - rss0, "rss_run_kib": _rss_kib() - rss0,
            "serial_ops": puts / serial_s, "serial_p50_ms": statistics.median(serial) * 1000,
            "concurrent_ops": puts / concurrent_s, "op_cpu_ms": serial_cpu / puts * 1000,
            "presign_cpu_us": presign_cpu / PRESIGNS * 1e6,
            "url_signed": "X-Amz-Signature=" in url, "bucket": bucket}


# --- installed size ----------------------------------------------------------------------------------

def _requires(name: str) -> list[str]:
    try:
        reqs = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    return [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]


def _closure(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop().lower().replace("_", "-")
        if n not in seen:
            seen.add(n)
            todo.extend(_requires(n))
    return seen


def _dist_bytes(name: str) -> int:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0
    total = 0
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            total += path.stat().st_size
    return total


def installed_size(client: str) -> tuple[int, list[str]]:
    """Bytes the client adds to the gateway's install, and the packages that make them."""
    base = _closure("gateway") - {"gateway"}
    extra = sorted(_closure(client) - base)
    return sum(_dist_bytes(n) for n in extra), extra


# --- driver ------------------------------------------------------------------------------------------

def _run_worker(client: str, weed: SeaweedS3, puts: int, concurrency: int) -> dict:
    args = [sys.executable, "-m", "bench.storage", "--worker", client, "--endpoint", weed.endpoint,
            "--puts", str(puts), "--concurrency", str(concurrency)]
    # Credentials go by environment, not argv (argv is visible in ps).
    env = {"BENCH_S3_KEY": weed.access_key, "BENCH_S3_SECRET": weed.secret_key, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent,
                          timeout=600, check=False)
    if done.returncode:
        raise RuntimeError(f"{client} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(client: str, runs: list[dict]) -> dict:
    out = dict(runs[0])
    for name, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = statistics.median(r[name] for r in runs)
    return out


def _report(results: list[dict], args: argparse.Namespace, took: float) -> str:
    rows = []
    for r in results:
        size, extra = installed_size(r["client"])
        rows.append([f"{r['client']} {r['version']}", f"{r['serial_ops']:.1f}", f"{r['serial_p50_ms']:.1f} ms",
                     f"{r['concurrent_ops']:.1f}", f"{r['op_cpu_ms']:.1f} ms", f"{r['presign_cpu_us']:.0f} µs",
                     f"{r['import_ms']:.0f} ms",
                     f"{r['rss_import_kib'] / 1024:.1f} MiB", f"{r['rss_run_kib'] / 1024:.1f} MiB",
                     f"{size / 1e6:.1f} MB ({', '.join(extra)})"])
    header = ["client", "put+presign ops/s, 1 at a time", "p50", f"ops/s, {args.concurrency} at once",
              "CPU per put+presign", "CPU per presign", "import", "RSS added by import", "RSS added after run",
              "installed size added"]
    lines = [f"## Image-store client ({now_utc():%Y-%m-%d %H:%M} UTC, gateway {git_revision()})", "",
             f"- command: `python -m bench.storage --puts {args.puts} --concurrency {args.concurrency} "
             f"--rounds {args.rounds}`; run took {took:.0f} s; each figure the median of {args.rounds} rounds",
             *machine_lines()[:2], f"- load average (1 min) at the end: {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} CPUs shared with other users of the machine",
             f"- store: SeaweedFS `weed server -s3` on loopback ({_weed_version()}), one process for both "
             "clients, each client in a fresh Python process",
             f"- each op: put of a {IMAGE_BYTES / 1e6:.1f} MB PNG, then a presigned GET URL (SigV4); "
             f"{args.puts} ops one at a time, then {args.puts} more {args.concurrency} at once; "
             f"CPU: this process's CPU time (not wall time, which a busy machine inflates) per op and per "
             f"presign alone, over {PRESIGNS} URLs",
             "- aiobotocore runs through gateway/imagestore/store.py (SigV4, path style, checksums only when "
             "required, 2 attempts); miniopy-async with its defaults",
             "- import and RSS: on top of aiohttp, prometheus-client and the gateway's error module, loaded "
             "anyway; installed size added: the client's dependency closure minus the gateway's own runtime "
             "packages",
             "", markdown_table(header, rows)]
    return "\n".join(lines)


def _weed_version() -> str:
    from gateway.devtools.seaweed import weed_binary

    out = subprocess.run([weed_binary(), "version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def main(argv: list[str] | None = None) -> int:
    """Measure both clients (or, with ``--worker``, one of them, printing JSON)."""
    p = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.splitlines()[0])
    p.add_argument("--puts", type=int, default=60)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="runs per client; the table shows medians")
    p.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    p.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = asyncio.run(_measure(args.worker, args.endpoint, os.environ["BENCH_S3_KEY"],
                                      os.environ["BENCH_S3_SECRET"], args.puts, args.concurrency))
        print(json.dumps(result))
        return 0
    started = time.monotonic()
    weed = SeaweedS3()
    try:
        t = time.monotonic()
        weed.start()
        print(f"weed ready in {time.monotonic() - t:.1f} s", file=sys.stderr)
        # Clients alternate, round after round, so a busy neighbour on the machine hits both alike.
        runs = [_run_worker(c, weed, args.puts, args.concurrency) for _ in range(args.rounds) for c in CLIENTS]
        results = [_median(c, [r for r in runs if r["client"] == c]) for c in CLIENTS]
    finally:
        weed.cleanup()
    section = _report(results, args, time.monotonic() - started)
    print(section)
    if not args.no_write:
        upsert_section("storage", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
