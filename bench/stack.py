"""The stack a benchmark run measures: its own redis-server, fake upstream and gateway."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from bench.procs import Proc, cpu_seconds, process_tree, start_fake, start_gateway, start_redis
from gateway.config import key_digest

UPSTREAM_KEY = "bench-upstream-key"
MODEL = "gpt-image-1"
SMALL = {"model": MODEL, "prompt": "a lighthouse at dusk", "size": "1024x1024", "quality": "low"}
HIGH = 10**12 - 1  # every limit set (admission and settlement run) but never reached; limits stay below 10^12
BENCH_PLAN = {"requests_per_minute": HIGH, "images_per_minute": HIGH, "max_concurrent_requests": 10**6,
              "tokens_per_day": HIGH, "tokens_per_month": HIGH, "images_per_day": HIGH,
              "images_per_month": HIGH, "usd_per_month": 1e9}


def gateway_config(key: str, spool: Path) -> dict[str, Any]:
    return {
        "upstream": {"timeout_seconds": 120},
        "usage": {"spool_path": str(spool)},
        "default_model": MODEL,
        "models": {MODEL: {"input_text_per_1m": 5.0, "input_image_per_1m": 10.0, "output_per_1m": 40.0}},
        "plans": {"bench": BENCH_PLAN},
        "keys": [{"user": "bench", "team": "bench", "plan": "bench", "name": "bench",
                  "sha256": key_digest(key)}],
    }


@dataclass
class Stack:
    redis: Proc
    fake: Proc
    gateway: Proc
    gateway_key: str
    workers: int

    @property
    def direct(self) -> tuple[str, dict[str, str]]:
        return self.fake.url + "/v1/images/generations", {"TT-API-KEY": UPSTREAM_KEY}

    @property
    def through(self) -> tuple[str, dict[str, str]]:
        return self.gateway.url + "/v1/images/generations", {"Authorization": f"Bearer {self.gateway_key}"}

    def targets(self) -> list[tuple[str, str, dict[str, str]]]:
        return [("direct", *self.direct), ("through", *self.through)]

    def redis_calls(self) -> Counter[str]:
        client = redis.Redis(port=self.redis.port, socket_timeout=5)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})

    def busiest_worker(self) -> int:
        """The gateway worker that has used the most CPU: with several workers, not uvicorn's supervisor
        (which may have used more than idle workers before any load, loading the config)."""
        tree = process_tree(self.gateway.pid)
        workers = [pid for pid in tree if pid != self.gateway.pid] or tree
        return max(workers, key=cpu_seconds)

    def fds(self) -> int:
        total = 0
        for pid in process_tree(self.gateway.pid):
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total


@contextlib.contextmanager
def running_stack(workers: int, cpus: set[int] | None = None) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    procs: list[Proc] = []
    try:
        red = start_redis(workdir)
        procs.append(red)
        fake = start_fake(UPSTREAM_KEY)
        procs.append(fake)
        key = "sk-igw-bench_" + secrets.token_urlsafe(24)
        config = workdir / "gateway.yaml"
        config.write_text(yaml.safe_dump(gateway_config(key, workdir / "usage.spool")))
        env = {"TTAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_BASE_URL": fake.url,
               "REDIS_URL": f"redis://127.0.0.1:{red.port}/0",
               # As the container image runs it: multiprocess metrics files, even with one worker.
               "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
               "GATEWAY_GRACE_SECONDS": "5"}
        gw = start_gateway(config, env, workers, cpus)
        procs.append(gw)
        yield Stack(red, fake, gw, key, workers)
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
