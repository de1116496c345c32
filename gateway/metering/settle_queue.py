"""Settlements that could not reach Redis: a bounded in-memory queue, retried, then a spool file.

``SettleQueue.settle`` makes one attempt on the request path; on a Redis error the
settlement joins the queue (``gateway_usage_pending_settlements``) and a background task
retries it with exponential backoff (``BACKOFF_START`` doubling up to ``BACKOFF_CAP``), in
order. The request never waits on a retry. At shutdown (``close``) whatever is still
queued is appended to the spool (``spool.py``); a full queue spills there too. At start
(``start``) a worker claims the spool and replays it; the claimed file is deleted once
everything from it has been settled or spooled again. Replays are harmless: ``settle.lua``
is idempotent on the request id. Disk I/O (fsync) runs in a thread, never on the event loop.

A settlement that can be neither settled nor spooled (no spool configured, a disk error, or
an error that retrying would not cure) is logged with its request id and counted in
``gateway_usage_lost_settlements_total{reason}``: never lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from gateway.limits.limiter import Admission, Limiter, utc_periods
from gateway.metering.metrics import Metrics
from gateway.metering.spool import Settlement, Spool, describe, remove_claimed
from gateway.redisdb.client import REDIS_ERRORS
from gateway.redisdb.keys import RedisKeys

__all__ = ["SettleQueue", "Settlement", "Spool", "unmetered_admission"]  # Settlement, Spool: re-exported

log = logging.getLogger("gateway.settle")

BACKOFF_START = 0.05
BACKOFF_CAP = 5.0


def unmetered_admission(request_id: str, user: str, started_ms: int) -> Admission:
    """An Admission for a request served without one (Redis down, policy allow): nothing reserved.

    settle.lua then only adds the usage to the day and month of ``started_ms`` and appends the record.
    """
    periods = utc_periods(started_ms)
    return Admission(request_id=request_id, user=user, now_ms=started_ms, lease_deadline_ms=started_ms,
                     day=periods.day, month=periods.month, reserved_tokens=0, reserved_images=0,
                     reserved_usd_micros=0, headers={})


class SettleQueue:
    """Settles through the limiter; what Redis refuses is retried in the background, then spooled."""

    def __init__(self, limiter: Limiter, metrics: Metrics, *, redis: Any = None,
                 keys: RedisKeys | None = None, max_size: int = 100_000, spool: Spool | None = None) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.redis = redis  # for the users index; None: not kept
        self.keys = keys or limiter.keys
        self.max_size = max_size
        self.spool = spool
        self.pending: deque[Settlement] = deque()
        self._users: set[str] = set()  # users this process has put in the users index
        self._task: asyncio.Task[None] | None = None
        self._claimed: list[str] = []
        self._closed = False

    async def start(self) -> None:
        """Replay what a previous run spooled (in the background: the worker starts serving at once)."""
        if self.spool is None:
            return
        try:
            claimed = await asyncio.to_thread(self.spool.claim)
        except OSError as exc:  # e.g. the spool's directory cannot be read: report it, serve anyway
            log.error("usage spool %s not replayed: %s", self.spool.path, describe(exc))
            return
        for path, settlements in claimed:
            self._claimed.append(path)
            log.info("replaying %d spooled settlements from %s", len(settlements), path)
            for s in settlements:
                await self._enqueue(s)
        if not self.pending:
            await self._forget_claimed()
        self._wake()

    async def settle(self, settlement: Settlement) -> None:
        """Settle now if Redis answers, else queue it; never raises, never waits on a retry."""
        if self._closed:
            # A stream drained after shutdown began: straight to the spool, replayed at the next start.
            if not await self._try(settlement):
                await self._spool([settlement], "after shutdown")
            return
        if not self.pending and await self._try(settlement):
            return
        await self._enqueue(settlement)
        self._wake()

    async def _try(self, settlement: Settlement) -> bool:
        """One attempt; False if Redis failed (worth a retry). Any other failure spools it, or counts it lost."""
        try:
            user = settlement.admission.user
            if self.redis is not None and user not in self._users:
                await self.redis.sadd(self.keys.users(), user)
                self._users.add(user)
            await self.limiter.settle(settlement.admission, settlement.usage, settlement.record)
        except REDIS_ERRORS as exc:
            self.metrics.redis_errors.labels("settle").inc()
            log.warning("settle of %s failed (%s); queued for retry", settlement.admission.request_id,
                        type(exc).__name__)
            return False
        except Exception as exc:  # not Redis: retrying would not help; keep it on disk for an operator
            await self._spool([settlement], f"settle of {settlement.admission.request_id} failed "
                                            f"({type(exc).__name__})")
        return True

    async def _enqueue(self, settlement: Settlement) -> None:
        if len(self.pending) >= self.max_size:
            # Full: the disk keeps it until the next start rather than growing memory without bound.
            await self._spool([settlement], f"settle queue full ({self.max_size})")
            return
        self.pending.append(settlement)
        self.metrics.usage_pending.set(len(self.pending))

    async def _spool(self, settlements: list[Settlement], why: str) -> None:
        """Append to the spool in a thread; what cannot be written there is logged and counted as lost."""
        if self.spool is None:
            self._lost(settlements, "no_spool", f"{why}; no usage.spool_path")
            return
        try:
            written = await asyncio.to_thread(self.spool.append, settlements)
        except OSError as exc:
            self._lost(settlements, "spool_error", f"{why}; usage spool unusable: {describe(exc)}")
            return
        log.warning("%s: %d settlements spooled to %s", why, written, self.spool.path)

    def _lost(self, settlements: list[Settlement], reason: str, detail: str) -> None:
        self.metrics.settlements_lost.labels(reason).inc(len(settlements))
        ids = [s.admission.request_id for s in settlements]
        log.error("%d settlements LOST (%s): %s%s", len(ids), detail, ", ".join(ids[:20]),
                  " ..." if len(ids) > 20 else "")

    def _wake(self) -> None:
        if self.pending and not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        delay = BACKOFF_START
        while self.pending and not self._closed:
            if await self._try(self.pending[0]):
                self.pending.popleft()
                self.metrics.usage_pending.set(len(self.pending))
                delay = BACKOFF_START
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP)
        if not self.pending:
            await self._forget_claimed()

    async def _forget_claimed(self) -> None:
        """Everything replayed from the claimed files is settled: they are no longer needed."""
        if self._claimed:
            await asyncio.to_thread(remove_claimed, list(self._claimed))
            self._claimed.clear()

    async def close(self) -> None:
        """Stop retrying; one last attempt, then spool whatever Redis did not take."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.pending and await self._try(self.pending[0]):
            self.pending.popleft()
            while self.pending and await self._try(self.pending[0]):
                self.pending.popleft()
        if self.pending:
            await self._spool(list(self.pending), "shutdown")
            self.pending.clear()
        self.metrics.usage_pending.set(0)
        await self._forget_claimed()
