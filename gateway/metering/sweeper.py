"""The background sweep: each worker, every ``limits.sweep_interval_seconds``, records the leases
that expired without a settle (their worker died), so their ``settled: false`` records appear even
when the user sends nothing more (the next admit of the user would record them too).

Users with in-flight entries are found by asking each known user's lease set for one expired
entry (pipelined, a page of users per round trip); ``sweep.lua`` then runs once per such user,
so every script call touches one user's hash tag (one Cluster slot). Several workers sweeping at
once is harmless: a lease is expired once, the others find nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

from gateway.limits.limiter import Limiter
from gateway.metering.ledger import known_users
from gateway.metering.metrics import Metrics
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.keys import RedisKeys

log = logging.getLogger("gateway.sweep")
PAGE = 500


class LeaseSweeper:
    """Records expired, unsettled leases in the background (one task per worker)."""

    def __init__(self, limiter: Limiter, redis: Any, keys: RedisKeys, *, interval_seconds: float,
                 static_users: Iterable[str] = (), metrics: Metrics | None = None) -> None:
        self.limiter = limiter
        self.redis = redis
        self.keys = keys
        self.interval_seconds = interval_seconds
        self.static_users = frozenset(static_users)  # users of config-file keys: not in the users set
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            # Jittered, so the workers of a fleet do not all sweep in the same instant.
            await asyncio.sleep(self.interval_seconds * random.uniform(0.5, 1.5))
            try:
                await self.sweep_once()
            except REDIS_ERRORS as exc:
                if self.metrics is not None:
                    self.metrics.redis_errors.labels("sweep").inc()
                log.warning("lease sweep failed (%s); next try in %g s", type(exc).__name__, self.interval_seconds)

    async def sweep_once(self, now_ms: int | None = None) -> int:
        """One pass over every user; returns the unsettled records written."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        users = sorted(set(await known_users(self.redis, self.keys)) | self.static_users)
        written = 0
        for start in range(0, len(users), PAGE):
            page = users[start:start + PAGE]
            async with self.redis.pipeline(transaction=False) as pipe:
                for user in page:
                    pipe.zrangebyscore(self.keys.inflight(user), "-inf", now, start=0, num=1)
                expired = await pipe.execute()
            for user, entries in zip(page, expired, strict=True):
                if entries:
                    written += await self.limiter.sweep(user, now)
        if written:
            log.warning("recorded %d request(s) whose worker died before settling (settled: false)", written)
        return written
